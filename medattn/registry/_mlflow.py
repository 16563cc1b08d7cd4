"""Plumbing shared by the registry helpers: a client per URI, quiet logging, one-line errors.

Everything here talks to MLflow through an explicit :class:`MlflowClient` bound to one URI
(tracking and registry share it), so no helper depends on, or leaves behind, MLflow's global
"current tracking URI". The one exception is :func:`fluent_tracking`, needed because
``mlflow.pyfunc.log_model`` only knows the global state; it restores that state on exit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from medattn.errors import RegistryError

# MLflow's error codes for "not found" / "already exists" (strings, as MlflowException carries them).
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"

_URI_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def quiet_mlflow() -> None:
    """Silence MLflow's chatter that is not a problem; warnings and errors still show.

    ``setdefault`` so that a user who wants the run links or progress bars back can export
    the variable. Idempotent and cheap: every public helper calls it.
    """
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the "🏃 View run" lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny copy
    # Schema creation/migration of a fresh sqlite db logs a dozen INFO lines.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client_for(tracking_uri: str):
    """An MlflowClient whose tracking *and* registry live at ``tracking_uri``."""
    quiet_mlflow()
    from mlflow import MlflowClient  # late: importing mlflow costs about a second

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


@contextmanager
def mlflow_errors(tracking_uri: str) -> Iterator[None]:
    """Turn any MlflowException escaping the block into a one-line :class:`RegistryError`.

    Callers catch the cases they can word better (unknown alias, unknown version) first;
    this is the net for the rest (server down, database locked, permission denied).
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"MLflow at {tracking_uri}: {first_line(exc)}") from exc


@contextmanager
def fluent_tracking(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's global tracking/registry URI at ``tracking_uri`` for the block.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (for subprocesses), which
    would then override :func:`resolve_tracking_uri` for the rest of the process; the exact
    previous environment is therefore restored afterwards.
    """
    import mlflow

    saved = {name: os.environ.get(name) for name in _URI_ENV_VARS}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
