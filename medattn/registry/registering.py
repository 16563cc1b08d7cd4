"""Registering: log a bundle as an MLflow pyfunc model of a run, create a registered version.

Everything goes through a client bound to the given URI, never MLflow's fluent API:
``mlflow.pyfunc.log_model`` only knows the process-global tracking URI and active run, so
using it meant swapping that global state in and out around the call (not thread-safe, and a
leak into ``MLFLOW_TRACKING_URI`` if it went wrong). The steps it takes are done here with
the client instead: create the logged model, save the pyfunc locally, upload it, finalize.

Each version is tagged with the bundle's content hash, so the register stage can reuse the
version that already holds the same weights (:func:`existing_version`) instead of a copy.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from medattn.errors import RegistryError
from medattn.registry._mlflow import (
    ALREADY_EXISTS,
    client_for,
    error_code,
    mlflow_errors,
)
from medattn.registry.location import resolve_tracking_uri
from medattn.registry.lookup import DEFAULT_METRIC, quoted, version_number
from medattn.registry.pyfunc import (
    BUNDLE_ARTIFACT,
    ENTRY_SCRIPT,
    check_bundle_dir,
    code_paths,
    model_signature,
    pip_requirements,
)
from medattn.registry.runs import get_run

BUNDLE_HASH_TAG = "bundle_sha256"
LOGGED_MODEL_NAME = "model"


def log_bundle_model(
    run_id: str,
    bundle_dir: str | Path,
    model_name: str,
    *,
    tracking_uri: str | None = None,
    metric_key: str = DEFAULT_METRIC,
    metric: float | None = None,
    data_source: str | None = None,
    tags: dict[str, Any] | None = None,
    await_ready_s: float = 300.0,
) -> str:
    """Log ``bundle_dir`` as a pyfunc model of run ``run_id``, register it, wait for READY.

    The version is tagged with ``run_id``, ``metric_key`` and ``data_source``; the last two
    default to the run's metric and its ``data.source`` param. The run's status is left as
    it is (the stage that owns it may still be working). Returns the version number.
    """
    bundle_dir = Path(bundle_dir)
    check_bundle_dir(bundle_dir)
    uri = tracking_uri or resolve_tracking_uri()
    run = get_run(run_id, uri)
    if metric is None:
        metric = run.data.metrics.get(metric_key)
    if data_source is None:
        data_source = run.data.params.get("data.source")
    version_tags = {"run_id": run_id, **{k: str(v) for k, v in (tags or {}).items()}}
    if metric is not None:
        version_tags[metric_key] = repr(float(metric))
    if data_source is not None:
        version_tags["data_source"] = str(data_source)

    client = client_for(uri)
    with mlflow_errors(uri):
        logged = _log_pyfunc_model(client, run, bundle_dir)
        _ensure_registered_model(client, model_name)
        # The artifact location, not "models:/<model_id>": MLflow's sqlite registry resolves
        # that URI with a client on the *global* tracking URI.
        created = client.create_model_version(
            model_name, source=logged.artifact_location, run_id=run_id, tags=version_tags,
            model_id=logged.model_id, await_creation_for=0,
        )
        _wait_until_ready(client, model_name, version_number(created), await_ready_s)
    return version_number(created)


def bundle_hash(bundle_dir: Path) -> str:
    """SHA-256 over the bundle's spec and weights: equal hashes mean the same model."""
    from medattn.models.bundle import SPEC_FILE, WEIGHTS_FILE  # late: imports torch

    digest = hashlib.sha256()
    for name in (SPEC_FILE, WEIGHTS_FILE):  # this order: it is in every registered hash tag
        path = bundle_dir / name
        if not path.is_file():
            raise RegistryError(f"{bundle_dir}: not a model bundle (missing {name})")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def existing_version(model_name: str, content_hash: str, tracking_uri: str) -> str | None:
    """The registered version of ``model_name`` holding exactly this bundle, if any."""
    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        if not client.search_registered_models(filter_string=f"name = {quoted(model_name)}"):
            return None
        for version in client.search_model_versions(f"name = {quoted(model_name)}"):
            if version.tags.get(BUNDLE_HASH_TAG) == content_hash:
                return version_number(version)
    return None


def _log_pyfunc_model(client, run, bundle_dir: Path):
    """What ``mlflow.pyfunc.log_model`` does, through ``client``; returns the READY LoggedModel."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run_id = run.info.run_id
    logged = client.create_logged_model(
        run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
        params={key: str(value) for key, value in run.data.params.items()},
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        _link_run_metrics(client, run_id, logged.model_id)
        with tempfile.TemporaryDirectory(prefix="medattn-pyfunc-") as scratch:
            local = Path(scratch) / LOGGED_MODEL_NAME
            with warnings.catch_warnings():
                # We pass an explicit signature; an input example would need a real model to run.
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                mlflow.pyfunc.save_model(
                    path=str(local),
                    python_model=str(ENTRY_SCRIPT),
                    artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
                    code_paths=code_paths(),
                    signature=model_signature(),
                    pip_requirements=pip_requirements(),
                    mlflow_model=Model(
                        artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                        run_id=run_id, model_id=logged.model_id,
                    ),
                )
            # Saving loads the model once (models from code), which leaves bytecode behind.
            for cache in list(local.rglob("__pycache__")):
                shutil.rmtree(cache, ignore_errors=True)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _link_run_metrics(client, run_id: str, model_id: str) -> None:
    """Attach the run's step-0 metrics to the logged model, as ``log_model`` does (UI model page)."""
    from mlflow.entities import Metric

    linked = [
        Metric(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step, run_id=run_id,
               dataset_name=m.dataset_name, dataset_digest=m.dataset_digest, model_id=model_id)
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
        if m.step == 0 and m.model_id is None
    ]
    if linked:
        client.log_batch(run_id, metrics=linked)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="medattn attention classifier (pyfunc + bundle)")
    except MlflowException as exc:
        if error_code(exc) != ALREADY_EXISTS:
            raise


def _wait_until_ready(client, name: str, version: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(f"registry: model {name!r} version {version} is {status}, not READY")
        time.sleep(0.5)
