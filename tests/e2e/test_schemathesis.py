"""Property-based requests from the service's published OpenAPI schema: no input is a 5xx.

Schemathesis reads ``/docs.json`` (BentoML's schema, which merges the medattn routes with
``/livez``, ``/readyz`` and ``/metrics``) and generates, per operation, schema-valid requests and
schema-violating ones (negative mode, where an operation has an input to violate), with an admin
token so that the bodies reach the code behind the auth check; a third pass sends whatever
``Authorization`` header it makes up. Examples are bounded and derandomized, so the run is
deterministic and takes a few seconds per operation.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from service_harness import Served

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 12


def run_operation(operation, mode, served: Served, headers: dict, seen: Counter, failures: list) -> None:
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(base_url=served.url, headers=headers, timeout=60)
        seen[(operation.label, response.status_code)] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except Exception as exc:  # noqa: BLE001 - collected, reported together below
            failures.append(f"{operation.label} -> {response.status_code}: {response.text[:300]} ({exc})")

    check()


def has_violable_input(operation) -> bool:
    """A body or a constrained parameter (any string is a valid optional Authorization header)."""
    definition = operation.definition.raw
    names = {p.get("name", "").lower() for p in definition.get("parameters", [])}
    return bool(definition.get("requestBody") or names - {"authorization"})


def test_no_generated_request_gets_a_server_error(served: Served):
    schema = schemathesis.openapi.from_url(f"{served.url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /predict", "POST /predict_batch", "POST /feedback", "GET /feedback", "POST /reload",
            "GET /readyz", "GET /metrics"} <= labels

    seen: Counter = Counter()
    failures: list[str] = []
    admin = served.headers("admin")
    for operation in operations:
        run_operation(operation, schemathesis.GenerationMode.POSITIVE, served, admin, seen, failures)
        if has_violable_input(operation):
            run_operation(operation, schemathesis.GenerationMode.NEGATIVE, served, admin, seen, failures)
        if operation.definition.raw.get("parameters"):  # the routes' own; infra ones take no token
            run_operation(operation, schemathesis.GenerationMode.POSITIVE, served, {}, seen, failures)

    assert not failures, "\n".join(failures[:20])
    statuses = Counter(status for (_, status) in seen.elements())
    assert sum(statuses.values()) >= 100, seen
    # Bodies reached the code behind auth (not everything stopped at 401) and some were accepted.
    assert seen[("POST /predict", 200)] > 0 and statuses[401] > 0 and statuses[422] > 0, seen
