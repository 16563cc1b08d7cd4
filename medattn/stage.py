"""How a pipeline stage or CLI command fails: one line naming the problem, non-zero exit.

A ``MedattnError`` (bad param, missing file, corrupt image, failed validation) is the user's
to fix, so it is printed as ``error: <message>`` without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

from medattn.errors import MedattnError

T = TypeVar("T")


def quiet_third_party_logs() -> None:
    """Keep stage output readable: progress bars and our summaries, not library chatter."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "great_expectations", "urllib3", "git"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_stage(main: Callable[[], T]) -> T:
    """Run ``main``; turn a user-facing error into ``error: ...`` on stderr and exit status 1."""
    quiet_third_party_logs()
    try:
        return main()
    except MedattnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted: outputs of this stage were not written", file=sys.stderr)
        raise SystemExit(130) from None


def repo_path(relative: str) -> Path:
    """A path relative to the current DVC workspace (stages run from the workspace root)."""
    return Path.cwd() / relative
