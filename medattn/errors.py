"""Errors a user can act on.

Every failure caused by the user's input (a path, a file, a parameter, a request) is raised
as a ``MedattnError`` subclass whose message names the offending thing in one line. The CLI
and the pipeline stages print that line and exit non-zero instead of a traceback; the HTTP
service maps it to a 4xx JSON body.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name: for one-line errors.

    Third-party exceptions (torch, PIL, SQLAlchemy, YAML) often carry pages of context; a user
    needs the first line, and the full text stays in the chained traceback for debugging.
    """
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return exc.__class__.__name__


class MedattnError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 2


class ParamError(MedattnError):
    """A value in params.yaml (or a CLI flag) is missing, of the wrong type or out of range."""


class DataError(MedattnError):
    """A dataset folder, label file or image is missing, unreadable or inconsistent."""


class ValidationFailed(MedattnError):
    """The data validation suite found failing expectations (the report names the rows)."""


class ModelError(MedattnError):
    """An unknown model name, an incompatible checkpoint or weights file."""


class RegistryError(MedattnError):
    """The MLflow registry has no such model, version or alias."""
