"""Plumbing shared by the registry helpers: a client per URI, quiet logging, one-line errors.

Every helper talks to MLflow through an explicit :class:`MlflowClient` bound to one URI
(tracking and registry share it), so none depends on, or leaves behind, MLflow's global
"current tracking URI" or active run: calls for different URIs, from different threads,
cannot redirect one another.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from medattn.errors import RegistryError, first_line

# MLflow's error codes for "not found" / "already exists" (strings, as MlflowException carries them).
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


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
