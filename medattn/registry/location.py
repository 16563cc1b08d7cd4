"""Where MLflow data lives: tracking URI resolution, artifact locations, the ``mlflow ui`` command.

Precedence (first non-empty wins):

1. env ``MEDATTN_TRACKING_URI`` (this project only),
2. env ``MLFLOW_TRACKING_URI`` (MLflow's standard variable),
3. ``params.yaml: mlflow.tracking_uri``,
4. default ``sqlite:///<repo>/mlflow.db``, artifacts in ``<repo>/mlartifacts/<experiment>``.

Relative local paths (``sqlite:///mlflow.db``, ``./mlruns``) are taken relative to the repo
root, not the working directory. That matters because ``dvc exp run --temp`` and queued
experiments run in a throw-away copy at ``<repo>/.dvc/tmp/exps/<tmpXXX>/`` (older DVC:
``.dvc/tmp/exps/run/...``): resolving against that copy would scatter runs over databases
that vanish with it, instead of the one database ``mlflow ui`` shows.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
URI_ENV_VARS = ("MEDATTN_TRACKING_URI", "MLFLOW_TRACKING_URI")
_DVC_EXPS_DIR = (".dvc", "tmp", "exps")
_SQLITE_PREFIX = "sqlite:///"


def find_repo_root(start: str | Path | None = None) -> Path:
    """The repository that owns ``start`` (default: the working directory).

    Inside a DVC temp workspace (a path containing ``.dvc/tmp/exps``) that is the real repo
    above ``.dvc``, although the copy has its own ``dvc.yaml`` and ``.git``. Otherwise, for the
    working directory, ``$DVC_ROOT`` when DVC runs us (it points experiments at the parent
    repo too). Otherwise the nearest ancestor holding ``dvc.yaml`` or ``.git``; failing all,
    ``start`` itself.
    """
    here = Path(start if start is not None else Path.cwd()).expanduser().absolute()
    parts = here.parts
    for i in range(len(parts) - len(_DVC_EXPS_DIR) + 1):
        if parts[i : i + len(_DVC_EXPS_DIR)] == _DVC_EXPS_DIR:
            return Path(*parts[:i])
    dvc_root = os.environ.get("DVC_ROOT", "").strip()
    if start is None and dvc_root and Path(dvc_root).is_dir():
        return Path(dvc_root).absolute()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / ".git").exists():
            return candidate
    return here


def resolve_tracking_uri(configured: str | None = None, start: str | Path | None = None) -> str:
    """The tracking (and registry) URI to use; see the module docstring for precedence."""
    for name in URI_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return _anchor_local_path(value, start)
    if configured and configured.strip():
        return _anchor_local_path(configured.strip(), start)
    return _SQLITE_PREFIX + str(find_repo_root(start) / DB_FILENAME)


def _anchor_local_path(uri: str, start: str | Path | None) -> str:
    """Make a relative sqlite path or bare local path absolute, relative to the repo root."""
    if uri.startswith(_SQLITE_PREFIX):
        db_path = uri[len(_SQLITE_PREFIX) :]
        if db_path and not db_path.startswith("/") and not db_path.startswith(":memory:"):
            return _SQLITE_PREFIX + str(find_repo_root(start) / db_path)
        return uri
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", uri):  # any other scheme: http, postgresql, file...
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else find_repo_root(start) / path)


def sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI with an absolute path, else None."""
    if not tracking_uri.startswith(_SQLITE_PREFIX):
        return None
    path = tracking_uri[len(_SQLITE_PREFIX) :].split("?", 1)[0]
    return Path(path) if path.startswith("/") else None


def artifact_root(tracking_uri: str) -> Path | None:
    """Local artifact folder for a sqlite store: ``mlartifacts/`` beside the database file.

    For any other store (a tracking server, PostgreSQL) None: the server decides.
    """
    db = sqlite_db_path(tracking_uri)
    return db.parent / ARTIFACTS_DIRNAME if db is not None else None


def experiment_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """``file://<root>/mlartifacts/<experiment>`` for sqlite stores, else None."""
    root = artifact_root(tracking_uri)
    if root is None:
        return None
    folder = re.sub(r"[^\w.\-]+", "_", experiment).strip("._") or "experiment"
    return (root / folder).as_uri()


def mlflow_ui_command(tracking_uri: str | None = None, start: str | Path | None = None) -> str:
    """The shell command that shows this project's runs and registry.

    For a tracking server (http/https) there is nothing to start: the line says where to look.
    """
    uri = tracking_uri or resolve_tracking_uri(None, start)
    if uri.startswith(("http://", "https://")):
        return f"# the MLflow UI is served by the tracking server: open {uri}"
    command = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    root = artifact_root(uri)
    if root is not None:
        # Only for experiments created from the UI; ours carry their own artifact location.
        command += f" --default-artifact-root {shlex.quote(root.as_uri())}"
    return command
