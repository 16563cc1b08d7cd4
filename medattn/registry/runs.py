"""One MLflow run per pipeline execution, shared by the DVC stages that run as separate processes.

The train stage calls :func:`start_pipeline_run` and :func:`write_run_ref` (a small JSON file,
a DVC output); evaluate and register call :func:`read_run_ref` and log into the same run id,
inside :func:`resumed_run` so the run reads RUNNING while a stage works and FAILED if it
crashes. All logging goes through a client bound to an explicit URI: no global active run.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medattn.atomic_files import write_json_atomic
from medattn.errors import RegistryError
from medattn.registry._mlflow import (
    ALREADY_EXISTS,
    NOT_FOUND,
    client_for,
    error_code,
    mlflow_errors,
)
from medattn.registry.location import experiment_artifact_location

# MLflow limits (mlflow.utils.validation); copied so importing this module stays cheap.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_TRUNCATION_MARK = "...[truncated]"
# Environment DVC sets for experiment runs -> run tags.
_DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}


@dataclass(frozen=True)
class RunRef:
    """What a later stage needs to find the run the train stage created."""

    run_id: str
    tracking_uri: str


def ensure_experiment(experiment: str, tracking_uri: str) -> str:
    """Id of ``experiment``, creating it (artifacts under ``<repo>/mlartifacts``) or restoring it."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return client.create_experiment(
                experiment, artifact_location=experiment_artifact_location(tracking_uri, experiment)
            )
        except MlflowException as exc:  # a parallel worker created it first
            if error_code(exc) != ALREADY_EXISTS:
                raise
            return client.get_experiment_by_name(experiment).experiment_id


def start_pipeline_run(
    params_flat: Mapping[str, Any],
    experiment: str,
    tracking_uri: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Create a RUNNING run holding every parameter; returns its id (end it with :func:`end_run`).

    Under ``dvc exp run`` the run is named after the DVC experiment and tagged with it, so
    ``dvc exp show`` and the MLflow UI can be matched up.
    """
    all_tags = {tag: os.environ[var] for var, tag in _DVC_ENV_TAGS.items() if os.environ.get(var)}
    all_tags.update(tags or {})
    run_name = run_name or os.environ.get("DVC_EXP_NAME") or None
    experiment_id = ensure_experiment(experiment, tracking_uri)
    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        run = client.create_run(
            experiment_id, run_name=run_name,
            tags={_clean_key(k): _to_text(v, MAX_TAG_VALUE_LENGTH) for k, v in all_tags.items()},
        )
    log_params(run.info.run_id, params_flat, tracking_uri)
    return run.info.run_id


def log_params(run_id: str, params: Mapping[str, Any], tracking_uri: str) -> None:
    """Log parameters as text (MLflow keeps at most 6000 characters of a value)."""
    from mlflow.entities import Param

    entries = [Param(_clean_key(k), _to_text(v, MAX_PARAM_VALUE_LENGTH)) for k, v in params.items()]
    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        for chunk in _chunks(entries, MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=chunk)


def end_run(run_id: str, tracking_uri: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED (or FAILED / KILLED)."""
    with mlflow_errors(tracking_uri):
        client_for(tracking_uri).set_terminated(run_id, status=status)


@contextmanager
def pipeline_run(
    params_flat: Mapping[str, Any],
    experiment: str,
    tracking_uri: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """:func:`start_pipeline_run` as a block: FINISHED on success, FAILED on an exception."""
    run_id = start_pipeline_run(params_flat, experiment, tracking_uri, run_name, tags)
    with _terminated_on_exit(run_id, tracking_uri):
        yield run_id


@contextmanager
def resumed_run(ref: RunRef) -> Iterator[str]:
    """Continue an existing run from a later stage: RUNNING inside, FINISHED/FAILED after."""
    client = client_for(ref.tracking_uri)
    get_run(ref.run_id, ref.tracking_uri)  # unknown id -> RegistryError before anything is logged
    with mlflow_errors(ref.tracking_uri):
        client.update_run(ref.run_id, status="RUNNING")
    with _terminated_on_exit(ref.run_id, ref.tracking_uri):
        yield ref.run_id


@contextmanager
def _terminated_on_exit(run_id: str, tracking_uri: str) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        # Best effort: if MLflow itself is what failed, the original error is the one to see.
        with suppress(RegistryError):
            end_run(run_id, tracking_uri, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    end_run(run_id, tracking_uri, status="FINISHED")


def get_run(run_id: str, tracking_uri: str):
    """The MLflow Run, or a RegistryError naming the id."""
    from mlflow.exceptions import MlflowException

    try:
        return client_for(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        if error_code(exc) == NOT_FOUND:
            raise RegistryError(f"MLflow at {tracking_uri}: no run with id {run_id!r}") from exc
        raise RegistryError(f"MLflow at {tracking_uri}: cannot read run {run_id!r}") from exc


def log_epoch_metrics(
    run_id: str,
    history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[float]],
    tracking_uri: str,
) -> int:
    """Log per-epoch curves with ``step = epoch``; returns the number of points logged.

    ``history`` is either one mapping per epoch (``[{"epoch": 1, "train_loss": 0.7, ...}]``;
    without an ``epoch`` key the position counts, from 0), or one sequence per metric
    (``{"train_loss": [0.7, 0.5]}``, step = position). Non-numeric entries are skipped.
    """
    if isinstance(history, Mapping):
        rows: Iterable[tuple[int, Mapping[str, Any]]] = (
            (step, {key: values[step]})
            for key, values in history.items()
            for step in range(len(values))
        )
    else:
        rows = ((int(row.get("epoch", position)), row) for position, row in enumerate(history))
    points = [
        (key, value, step)
        for step, row in rows
        for key, value in _numeric_items(row)
        if key != "epoch"
    ]
    _log_metric_points(run_id, points, tracking_uri)
    return len(points)


def log_metrics(
    run_id: str, metrics: Mapping[str, Any], tracking_uri: str, step: int = 0
) -> None:
    """Log final metrics; nested mappings become dotted keys (``{"test": {"f1": 1}}`` -> ``test.f1``)."""
    _log_metric_points(run_id, [(k, v, step) for k, v in _numeric_items(_flatten(metrics))], tracking_uri)


def _log_metric_points(run_id: str, points: list[tuple[str, float, int]], tracking_uri: str) -> None:
    import time

    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    metrics = [Metric(_clean_key(k), v, now_ms, step) for k, v, step in points]
    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk)


def log_artifacts(
    run_id: str, paths: Iterable[str | Path], tracking_uri: str, artifact_dir: str | None = None
) -> None:
    """Upload files and folders (a folder keeps its name) under ``artifact_dir`` of the run."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RegistryError(f"cannot log artifact {missing[0]}: no such file or directory")
    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        for path in paths:
            if path.is_dir():
                target = f"{artifact_dir}/{path.name}" if artifact_dir else path.name
                client.log_artifacts(run_id, str(path), artifact_path=target)
            else:
                client.log_artifact(run_id, str(path), artifact_path=artifact_dir)


def write_run_ref(path: str | Path, run_id: str, tracking_uri: str) -> Path:
    """Write ``{"run_id", "tracking_uri"}`` to ``path`` atomically."""
    return write_json_atomic(path, asdict(RunRef(run_id, tracking_uri)))


def read_run_ref(path: str | Path) -> RunRef:
    """Read what :func:`write_run_ref` wrote; a missing or malformed file is a RegistryError."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: MLflow run reference not found (run the train stage first)")
    try:
        raw = json.loads(path.read_text())
        ref = RunRef(run_id=str(raw["run_id"]), tracking_uri=str(raw["tracking_uri"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{path}: not a run reference (expected JSON with run_id and tracking_uri)") from exc
    if not ref.run_id or not ref.tracking_uri:
        raise RegistryError(f"{path}: run_id and tracking_uri must not be empty")
    return ref


def _to_text(value: Any, limit: int | None = None) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = json.dumps(value)  # None -> null, True -> true: the spelling of params.yaml
    else:
        text = json.dumps(value, default=str, sort_keys=True)
    if limit is not None and len(text) > limit:
        text = text[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
    return text


def _clean_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``; anything else becomes ``_``."""
    return re.sub(r"[^\w.\-/ ]", "_", str(key))


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _numeric_items(row: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    # numbers.Real covers numpy scalars too; NaN is kept (a diverged epoch is worth seeing).
    for key, value in row.items():
        if isinstance(value, numbers.Real):
            yield str(key), float(value)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
