"""MLflow tracking + Model Registry helpers for medattn.

``from medattn.registry import resolve_tracking_uri, log_bundle_model, ...``. Names are loaded
on first use (PEP 562), so asking for a URI does not import MLflow (about a second).

- :mod:`~medattn.registry.location`: tracking URI precedence, repo root (DVC temp-safe), ``mlflow ui``
- :mod:`~medattn.registry.runs`: one run per pipeline execution, resumed by later stages
- :mod:`~medattn.registry.registering`: log a bundle as a pyfunc model, create a version, content-hash reuse
- :mod:`~medattn.registry.aliases`: champion/challenger gate, promote, roll back, champion history
- :mod:`~medattn.registry.lookup`: resolve a version, alias or ``latest``; describe it, download it
- :mod:`~medattn.registry.pyfunc`: the pyfunc model wrapping a trained bundle (code and requirements it carries)
- :mod:`~medattn.registry.pipeline`: the register stage (log, register, gate, write the decision)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "location": (
        "find_repo_root", "resolve_tracking_uri", "mlflow_ui_command", "experiment_artifact_location",
        "artifact_root", "URI_ENV_VARS",
    ),
    "runs": (
        "RunRef", "ensure_experiment", "start_pipeline_run", "pipeline_run", "resumed_run", "end_run",
        "get_run", "log_params", "log_epoch_metrics", "log_metrics", "log_artifacts",
        "write_run_ref", "read_run_ref",
    ),
    "registering": ("log_bundle_model", "bundle_hash", "existing_version", "BUNDLE_HASH_TAG"),
    "aliases": (
        "AliasChange", "HISTORY_TAG", "GateDecision", "assign_challenger_and_gate", "promote_challenger", "rollback_champion",
    ),
    "lookup": (
        "CHAMPION", "CHALLENGER", "DEFAULT_METRIC", "ModelVersionInfo", "get_model_version_info",
        "download_model_version",
    ),
    "pyfunc": ("MedattnPyfunc", "as_image_batch"),
    "pipeline": ("register_bundle",),
    "_mlflow": ("quiet_mlflow",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'medattn.registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medattn.registry.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
