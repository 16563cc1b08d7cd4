"""Model Registry: register a bundle, gate it against the champion, promote, roll back, download.

Aliases carry the lifecycle (MLflow stages are deprecated): ``challenger`` is the newest
candidate, ``champion`` is what the HTTP service serves. Every change of champion is appended
to the registered-model tag ``champion_history`` (a JSON list of versions), so a rollback
knows where to go even after several promotions.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medattn.errors import RegistryError
from medattn.registry._mlflow import (
    ALREADY_EXISTS,
    NOT_FOUND,
    client_for,
    error_code,
    fluent_tracking,
    mlflow_errors,
)
from medattn.registry.location import resolve_tracking_uri
from medattn.registry.pyfunc import (
    BUNDLE_ARTIFACT,
    ENTRY_SCRIPT,
    check_bundle_dir,
    model_signature,
    pip_requirements,
)
from medattn.registry.runs import get_run

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
DEFAULT_METRIC = "test_macro_f1"
_HISTORY_KEEP = 100  # entries; plenty for rollbacks, far below MLflow's tag size limit


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered version as the service and CLI see it; ``metric`` is its test macro-F1."""

    name: str
    version: str
    run_id: str | None
    aliases: tuple[str, ...]
    metric: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "aliases": list(self.aliases)}


@dataclass(frozen=True)
class GateDecision:
    """What :func:`assign_challenger_and_gate` did, and why (the register stage writes it as JSON)."""

    model_name: str
    version: str
    promoted: bool
    reason: str
    metric_key: str
    higher_is_better: bool
    metric: float | None
    champion_before: str | None
    champion_metric: float | None
    champion_after: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    default to the run's metric and its ``data.source`` param. Returns the version number.
    """
    import mlflow

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
    # Both steps need the global URI: registering a models:/<id> source resolves it again.
    with mlflow_errors(uri), fluent_tracking(uri):
        with _active_run_keeping_status(client, run_id), warnings.catch_warnings():
            # We pass an explicit signature; an input example would need a real model to run.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(ENTRY_SCRIPT),
                artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
                signature=model_signature(),
                pip_requirements=pip_requirements(),
            )
        _ensure_registered_model(client, model_name)
        created = client.create_model_version(
            model_name, source=info.model_uri, run_id=run_id, tags=version_tags,
            model_id=info.model_id, await_creation_for=0,
        )
        _wait_until_ready(client, model_name, _number(created), await_ready_s)
    return _number(created)


def assign_challenger_and_gate(
    model_name: str,
    version: str,
    metric_key: str = DEFAULT_METRIC,
    higher_is_better: bool = True,
    *,
    tracking_uri: str | None = None,
) -> GateDecision:
    """Alias ``version`` as challenger; make it champion unless it is worse than the champion.

    "Worse" compares ``metric_key`` (from the version tag, else its run's metric). A missing
    champion means promotion; a challenger without the metric stays challenger; a champion
    without the metric (logged before gating existed) is replaced by a measured challenger.
    """
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with mlflow_errors(uri):
        candidate = _version(client, model_name, str(version))
        champion = _alias_or_none(client, model_name, CHAMPION)
        client.set_registered_model_alias(model_name, CHALLENGER, _number(candidate))
        metric = _metric_of(client, candidate, metric_key)
        champion_metric = _metric_of(client, champion, metric_key) if champion else None
        champion_before = _number(champion) if champion else None
        promoted, reason = _judge(
            _number(candidate), metric, champion_before, champion_metric, metric_key, higher_is_better
        )
        if promoted and champion_before != _number(candidate):
            _set_champion(client, model_name, _number(candidate))
        client.set_model_version_tag(model_name, _number(candidate), "gate_reason", reason)
    return GateDecision(
        model_name=model_name, version=_number(candidate), promoted=promoted, reason=reason,
        metric_key=metric_key, higher_is_better=higher_is_better, metric=metric,
        champion_before=champion_before, champion_metric=champion_metric,
        champion_after=_number(candidate) if promoted else champion_before,
    )


def _judge(
    version: str, metric: float | None, champion: str | None, champion_metric: float | None,
    key: str, higher_is_better: bool,
) -> tuple[bool, str]:
    """(promote?, the reason in one line)."""
    if champion is None:
        return True, f"no champion yet: version {version} becomes champion"
    if champion == version:
        return True, f"version {version} is already champion"
    if metric is None:
        return False, f"version {version} has no {key}: champion stays version {champion}"
    if champion_metric is None:
        return True, f"champion version {champion} has no {key}: version {version} ({metric:.4f}) replaces it"
    not_worse = metric >= champion_metric if higher_is_better else metric <= champion_metric
    if not_worse:
        relation, outcome = (">=" if higher_is_better else "<="), f"version {version} becomes champion"
    else:
        relation, outcome = ("<" if higher_is_better else ">"), f"champion stays version {champion}"
    return not_worse, f"{key} {metric:.4f} {relation} champion's {champion_metric:.4f}: {outcome}"


def promote_challenger(model_name: str, *, tracking_uri: str | None = None) -> ModelVersionInfo:
    """Make the challenger champion unconditionally (an expert accepted it)."""
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with mlflow_errors(uri):
        challenger = _alias(client, model_name, CHALLENGER)
        champion = _alias_or_none(client, model_name, CHAMPION)
        if champion is None or _number(champion) != _number(challenger):
            _set_champion(client, model_name, _number(challenger))
        return _info(client, _version(client, model_name, _number(challenger)), DEFAULT_METRIC)


def rollback_champion(model_name: str, *, tracking_uri: str | None = None) -> ModelVersionInfo:
    """Point champion back at the champion before the current one (per ``champion_history``)."""
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with mlflow_errors(uri):
        current = _number(_alias(client, model_name, CHAMPION))
        history = _history(client, model_name)
        while history and history[-1] == current:
            history.pop()
        while history and _version_or_none(client, model_name, history[-1]) is None:
            history.pop()  # deleted since it was champion
        if not history:
            raise RegistryError(
                f"registry: model {model_name!r} has no previous champion to roll back to "
                f"(champion is version {current})"
            )
        previous = history[-1]
        client.set_registered_model_alias(model_name, CHAMPION, previous)
        client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
        client.set_model_version_tag(model_name, current, "rolled_back", "true")
        return _info(client, _version(client, model_name, previous), DEFAULT_METRIC)


def get_model_version_info(
    model_name: str, alias_or_version: str = CHAMPION, *,
    tracking_uri: str | None = None, metric_key: str = DEFAULT_METRIC,
) -> ModelVersionInfo:
    """Describe a version (by number, alias or ``latest``) without downloading it."""
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with mlflow_errors(uri):
        return _info(client, _resolve(client, model_name, alias_or_version), metric_key)


def download_model_version(
    model_name: str,
    alias_or_version: str = CHAMPION,
    dst: str | Path | None = None,
    *,
    tracking_uri: str | None = None,
    metric_key: str = DEFAULT_METRIC,
) -> tuple[Path, ModelVersionInfo]:
    """Fetch a registered model; returns (local bundle dir, its description).

    The model lands in ``<dst>/<name>-v<version>/`` (``dst`` defaults to a new temp dir),
    downloaded beside it and renamed into place, so a crash never leaves a half model there;
    versions are immutable, so an existing copy is reused.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with mlflow_errors(uri):
        found = _resolve(client, model_name, alias_or_version)
        info = _info(client, found, metric_key)
        root = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="medattn-model-"))
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"{_folder_name(model_name)}-v{_number(found)}"
        if not (target / "MLmodel").is_file():
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
            try:
                # The resolved artifact location, not "models:/name/version": resolving that
                # would consult MLflow's global URI instead of ``uri``.
                source = client.get_model_version_download_uri(model_name, _number(found))
                local = download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=uri)
                try:
                    Path(local).replace(target)
                except OSError:
                    if not (target / "MLmodel").is_file():
                        raise  # not just another process that finished the same download first
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        flavor = Model.load(str(target / "MLmodel")).flavors.get("python_function", {})
    bundle_rel = flavor.get("artifacts", {}).get(BUNDLE_ARTIFACT, {}).get("path")
    if not bundle_rel or not (target / bundle_rel).is_dir():
        raise RegistryError(f"registry: {model_name!r} version {_number(found)} is not a medattn model (no bundle)")
    return target / bundle_rel, info


# ---- internals -----------------------------------------------------------------------------


def _number(model_version) -> str:
    """MLflow returns version numbers as int or str depending on the call; we use str."""
    return str(model_version.version)


def _folder_name(model_name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", model_name)


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


@contextmanager
def _active_run_keeping_status(client, run_id: str) -> Iterator[None]:
    """``mlflow.start_run(run_id=...)`` around the block, leaving the run's status as it was.

    Fluent ``log_model`` needs an active run, but ending it would mark the run FINISHED while
    the stage that owns it (see :func:`medattn.registry.runs.resumed_run`) is still working.
    """
    import mlflow

    status = client.get_run(run_id).info.status
    active = mlflow.active_run()
    if active is not None:
        if active.info.run_id != run_id:
            raise RegistryError(f"cannot log a model to run {run_id}: run {active.info.run_id} is active in this process")
        yield
        return
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status="FINISHED" if status == "RUNNING" else status)
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")


def _version_or_none(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if error_code(exc) == NOT_FOUND:
            return None
        raise


def _require_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if error_code(exc) == NOT_FOUND:
            raise RegistryError(f"registry: no registered model {name!r} (register one first)") from exc
        raise


def _version(client, name: str, version: str):
    found = _version_or_none(client, name, version)
    if found is None:
        _require_model(client, name)
        raise RegistryError(f"registry: model {name!r} has no version {version} (latest is {_latest(client, name)})")
    return found


def _alias_or_none(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if error_code(exc) in (NOT_FOUND, "INVALID_PARAMETER_VALUE"):
            _require_model(client, name)
            return None
        raise


def _alias(client, name: str, alias: str):
    found = _alias_or_none(client, name, alias)
    if found is None:
        known = sorted(client.get_registered_model(name).aliases)
        raise RegistryError(
            f"registry: model {name!r} has no alias {alias!r} (aliases: {', '.join(known) or 'none'})"
        )
    return found


def _resolve(client, name: str, alias_or_version: str):
    """A version number ("3"), an alias ("champion") or "latest"."""
    key = str(alias_or_version).strip()
    if key.isdigit():
        return _version(client, name, key)
    if key == "latest":
        _require_model(client, name)
        latest = _latest(client, name)
        if latest is None:
            raise RegistryError(f"registry: model {name!r} has no versions")
        return _version(client, name, latest)
    return _alias(client, name, key)


def _latest(client, name: str) -> str | None:
    quoted = name.replace("'", "\\'")
    versions = client.search_model_versions(f"name = '{quoted}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def _metric_of(client, version, key: str) -> float | None:
    """The version's ``key`` tag, else its run's metric; non-finite counts as missing."""
    from mlflow.exceptions import MlflowException

    value: Any = version.tags.get(key)
    if value is None and version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(key)
        except MlflowException:
            value = None  # run deleted: the version is still servable, just unmeasured
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _history(client, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    try:
        history = json.loads(raw) if raw else []
    except ValueError:
        history = []  # hand-edited tag: start over rather than block promotions
    return [str(v) for v in history] if isinstance(history, list) else []


def _set_champion(client, name: str, version: str) -> None:
    history = [*_history(client, name), version][-_HISTORY_KEEP:]
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _info(client, version, metric_key: str) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=version.name,
        version=_number(version),
        run_id=version.run_id or None,
        aliases=tuple(sorted(version.aliases)),
        metric=_metric_of(client, version, metric_key),
    )
