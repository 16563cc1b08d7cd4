"""Property-based requests from the service's published OpenAPI schema: no input is a 5xx.

Schemathesis reads ``/docs.json`` (BentoML's schema, which merges the medattn routes with
``/livez``, ``/readyz`` and ``/metrics``) and generates, per operation, schema-valid requests and
schema-violating ones (negative mode, where an operation has an input to violate), with an admin
token so that the bodies reach the code behind the auth check; a third pass sends whatever
``Authorization`` header it makes up. Examples are bounded and derandomized, so the run is
deterministic and takes a few seconds per operation.

The server's memory is part of the check: the resident memory of all its processes (arbiter, API
worker, model runner) after the fuzz must be back near what it was after a warm-up, so no input
leaves memory held behind (``RSS_SLACK_*``).
"""

from __future__ import annotations

from collections import Counter

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from service_harness import Served

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 30
# Back near the baseline: allocator arenas and caches keep some growth; a leak per request does not fit.
RSS_SLACK_FRACTION = 0.25
RSS_SLACK_BYTES = 128 * 2**20


def server_rss(served: Served) -> int:
    total = 0
    for process in served.server.processes():
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


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
    for _ in range(3):  # warm-up: the first predictions allocate the model's working memory
        httpx.post(f"{served.url}/predict", headers=admin, timeout=60,
                   files={"image": ("a.png", _png(), "image/png")})
    baseline = server_rss(served)
    for operation in operations:
        run_operation(operation, schemathesis.GenerationMode.POSITIVE, served, admin, seen, failures)
        if has_violable_input(operation):
            run_operation(operation, schemathesis.GenerationMode.NEGATIVE, served, admin, seen, failures)
        if operation.definition.raw.get("parameters"):  # the routes' own; infra ones take no token
            run_operation(operation, schemathesis.GenerationMode.POSITIVE, served, {}, seen, failures)

    assert not failures, "\n".join(failures[:20])
    after = server_rss(served)
    print(f"server RSS: {baseline / 2**20:.0f} MiB before the fuzz, {after / 2**20:.0f} MiB after "
          f"({sum(seen.values())} requests)")
    assert after <= baseline * (1 + RSS_SLACK_FRACTION) + RSS_SLACK_BYTES, (baseline, after)
    statuses = Counter(status for (_, status) in seen.elements())
    assert sum(statuses.values()) >= 250, seen
    # Bodies reached the code behind auth (not everything stopped at 401) and some were accepted.
    assert seen[("POST /predict", 200)] > 0 and statuses[401] > 0 and statuses[422] > 0, seen


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 120, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
