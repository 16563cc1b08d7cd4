"""Model Registry lookup: resolve a version number, alias or ``latest``; describe or download it.

The lowest layer of the registry helpers: :mod:`~medattn.registry.aliases` and
:mod:`~medattn.registry.registering` build on the resolution helpers here, and the HTTP
service and CLI only ever need :func:`get_model_version_info` and :func:`download_model_version`.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medattn.errors import RegistryError
from medattn.registry._mlflow import NOT_FOUND, client_for, error_code, mlflow_errors
from medattn.registry.location import resolve_tracking_uri
from medattn.registry.pyfunc import BUNDLE_ARTIFACT

# Aliases carry the lifecycle (MLflow stages are deprecated): ``challenger`` is the newest
# candidate, ``champion`` is what the HTTP service serves.
CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_METRIC = "test_macro_f1"


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


def get_model_version_info(
    model_name: str, alias_or_version: str = CHAMPION, *,
    tracking_uri: str | None = None, metric_key: str = DEFAULT_METRIC,
) -> ModelVersionInfo:
    """Describe a version (by number, alias or ``latest``) without downloading it."""
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with mlflow_errors(uri):
        return describe(client, resolve_version(client, model_name, alias_or_version), metric_key)


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
        found = resolve_version(client, model_name, alias_or_version)
        info = describe(client, found, metric_key)
        root = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="medattn-model-"))
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"{_folder_name(model_name)}-v{version_number(found)}"
        if not (target / "MLmodel").is_file():
            # Not atomic_dir: an existing complete copy is kept, never swapped (see below).
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
            try:
                # The resolved artifact location, not "models:/name/version": resolving that
                # would consult MLflow's global URI instead of ``uri``.
                source = client.get_model_version_download_uri(model_name, version_number(found))
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
        raise RegistryError(
            f"registry: {model_name!r} version {version_number(found)} is not a medattn model (no bundle)"
        )
    return target / bundle_rel, info


# ---- resolution helpers shared by aliases and registering -----------------------------------


def version_number(model_version) -> str:
    """MLflow returns version numbers as int or str depending on the call; we use str."""
    return str(model_version.version)


def version_or_none(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if error_code(exc) == NOT_FOUND:
            return None
        raise


def require_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if error_code(exc) == NOT_FOUND:
            raise RegistryError(f"registry: no registered model {name!r} (register one first)") from exc
        raise


def get_version(client, name: str, version: str):
    found = version_or_none(client, name, version)
    if found is None:
        require_model(client, name)
        raise RegistryError(f"registry: model {name!r} has no version {version} (latest is {latest_version(client, name)})")
    return found


def alias_or_none(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if error_code(exc) in (NOT_FOUND, "INVALID_PARAMETER_VALUE"):
            require_model(client, name)
            return None
        raise


def get_alias(client, name: str, alias: str):
    found = alias_or_none(client, name, alias)
    if found is None:
        known = sorted(client.get_registered_model(name).aliases)
        raise RegistryError(
            f"registry: model {name!r} has no alias {alias!r} (aliases: {', '.join(known) or 'none'})"
        )
    return found


def resolve_version(client, name: str, alias_or_version: str):
    """A version number ("3"), an alias ("champion") or "latest"."""
    key = str(alias_or_version).strip()
    if key.isdigit():
        return get_version(client, name, key)
    if key == "latest":
        require_model(client, name)
        latest = latest_version(client, name)
        if latest is None:
            raise RegistryError(f"registry: model {name!r} has no versions")
        return get_version(client, name, latest)
    return get_alias(client, name, key)


def latest_version(client, name: str) -> str | None:
    versions = client.search_model_versions(f"name = {quoted(name)}")
    return str(max(int(v.version) for v in versions)) if versions else None


def quoted(value: str) -> str:
    """``value`` as a string literal of MLflow's search filter syntax."""
    return "'" + value.replace("'", "\\'") + "'"


def metric_of(client, version, key: str) -> float | None:
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


def describe(client, version, metric_key: str) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=version.name,
        version=version_number(version),
        run_id=version.run_id or None,
        aliases=tuple(sorted(version.aliases)),
        metric=metric_of(client, version, metric_key),
    )


def _folder_name(model_name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", model_name)
