"""The register stage in one call: log + register the bundle in the pipeline's run, gate it.

Kept here rather than in ``pipelines/register.py`` so that the script stays a thin
argument parser and the logic is unit-tested against a real MLflow.

Re-running the stage for the same weights (say, only an evaluation param changed) must not
pile up identical versions: the version already holding the bundle's content hash (see
:mod:`~medattn.registry.registering`) is gated again instead of registering a copy.

A gate that promotes is audited like any promotion (:mod:`medattn.feedback.audit`): actor
``$MEDATTN_ACTOR`` or ``register-stage``, in the service's feedback database
(``$MEDATTN_FEEDBACK_DB``, else ``<$MEDATTN_STATE_DIR or <repo>/.medattn>/feedback.db``, the
service's default), so ``GET /audit`` lists it beside the promotions done by hand.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from medattn.atomic_files import write_json_atomic
from medattn.config import Params
from medattn.errors import RegistryError
from medattn.registry.aliases import assign_challenger_and_gate
from medattn.registry.location import find_repo_root
from medattn.registry.lookup import DEFAULT_METRIC
from medattn.registry.registering import (
    BUNDLE_HASH_TAG,
    bundle_hash,
    existing_version,
    log_bundle_model,
)
from medattn.registry.runs import log_artifacts, read_run_ref, resumed_run

# Key of the test macro-F1 in the evaluate stage's metrics.json.
EVALUATE_MACRO_F1_KEY = "macro_f1"


def register_bundle(
    params: Params,
    bundle_dir: str | Path,
    metrics_path: str | Path,
    run_ref_path: str | Path,
    out_path: str | Path,
) -> dict[str, Any]:
    """Register ``bundle_dir`` as a new version of ``mlflow.model_name`` and gate it.

    The metric is the evaluate stage's test macro-F1 (``metrics_path``); the MLflow run is the
    one the train stage created (``run_ref_path``). Writes the decision JSON to ``out_path``
    (also logged to the run) and returns it.
    """
    macro_f1 = read_test_macro_f1(Path(metrics_path))
    ref = read_run_ref(run_ref_path)
    model_name = params.mlflow.model_name
    content_hash = bundle_hash(Path(bundle_dir))
    with resumed_run(ref) as run_id:
        version = existing_version(model_name, content_hash, ref.tracking_uri)
        reused = version is not None
        if version is None:
            version = log_bundle_model(
                run_id, bundle_dir, model_name, tracking_uri=ref.tracking_uri,
                metric_key=DEFAULT_METRIC, metric=macro_f1, data_source=params.data.source,
                tags={BUNDLE_HASH_TAG: content_hash},
            )
        decision = _audited_gate(model_name, version, ref.tracking_uri)
        payload = {**decision.to_dict(), "run_id": run_id, "tracking_uri": ref.tracking_uri,
                   "reused_existing_version": reused}
        write_json_atomic(out_path, payload)
        log_artifacts(run_id, [out_path], ref.tracking_uri, artifact_dir="register")
    return payload


GATE_ACTOR = "register-stage"


def audit_db_url() -> str:
    """Where the gate's promotions are audited: the service's feedback database (see the docstring)."""
    explicit = os.environ.get("MEDATTN_FEEDBACK_DB")
    if explicit:
        return explicit
    state = Path(os.environ.get("MEDATTN_STATE_DIR") or find_repo_root() / ".medattn")
    return f"sqlite:///{state / 'feedback.db'}"


def _audited_gate(model_name: str, version: str, tracking_uri: str):
    from medattn.feedback.audit import alias_change_recorder
    from medattn.feedback.store import FeedbackStore

    with FeedbackStore(audit_db_url()) as store:
        on_change = alias_change_recorder(store, os.environ.get("MEDATTN_ACTOR") or GATE_ACTOR, tracking_uri)
        return assign_challenger_and_gate(model_name, version, DEFAULT_METRIC, tracking_uri=tracking_uri,
                                          on_change=on_change)


def read_test_macro_f1(metrics_path: Path) -> float:
    """The evaluate stage's test macro-F1; a missing file or key is a one-line RegistryError."""
    if not metrics_path.is_file():
        raise RegistryError(f"{metrics_path}: not found (run the evaluate stage first)")
    try:
        value = json.loads(metrics_path.read_text()).get(EVALUATE_MACRO_F1_KEY)
    except (ValueError, AttributeError) as exc:
        raise RegistryError(f"{metrics_path}: not a JSON object of metrics") from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistryError(f"{metrics_path}: {EVALUATE_MACRO_F1_KEY!r} must be a finite number, got {value!r}")
    return float(value)
