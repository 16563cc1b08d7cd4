"""How a pipeline stage or CLI command fails: one line naming the problem, non-zero exit.

A ``MedattnError`` (bad param, missing file, corrupt image, failed validation) is the user's
to fix, so it is printed as ``error: <message>`` without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

from medattn.errors import MedattnError, ParamError

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


DVC_FILE = "dvc.yaml"


class PipelinePaths(dict[str, Path]):
    """Stage paths by name (``paths["prepared"]``); an unknown name is a one-line ``ParamError``."""

    def __init__(self, source: Path, paths: dict[str, Path]) -> None:
        super().__init__(paths)
        self.source = source

    def __missing__(self, name: str) -> Path:
        raise ParamError(f"{self.source}: vars.paths has no entry {name!r} (known: {', '.join(sorted(self))})")


def pipeline_paths(project_root: Path) -> PipelinePaths:
    """The ``vars: - paths:`` mapping of ``project_root/dvc.yaml``: every path a stage uses.

    dvc.yaml is the one place those paths are written: its stage commands pass them to the
    scripts (``--out ${paths.prepared}``) and its outs list them; the scripts take the same
    mapping as their argument defaults, so a script run by hand reads and writes where DVC
    expects. A missing or malformed dvc.yaml is a ``ParamError`` naming it.
    """
    import yaml  # late: most callers of this module only need run_stage

    dvc_file = project_root / DVC_FILE
    try:
        document = yaml.safe_load(dvc_file.read_text())
    except OSError as exc:
        raise ParamError(f"{dvc_file}: cannot read the pipeline definition ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ParamError(f"{dvc_file}: not valid YAML ({exc.__class__.__name__})") from exc
    entries = document.get("vars") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("paths"), dict):
            return PipelinePaths(dvc_file, {str(k): Path(str(v)) for k, v in entry["paths"].items()})
    raise ParamError(f"{dvc_file}: no 'vars: - paths:' mapping (where the stages read and write)")


class StageParser(argparse.ArgumentParser):
    """A stage script's command line: ``--params``, then paths whose defaults are dvc.yaml's.

    Every stage takes the same ``--params`` and defaults each path flag to the ``vars: paths``
    entry DVC passes it, so a script run by hand reads and writes where DVC expects::

        parser = StageParser(__doc__, PROJECT_ROOT)
        parser.add_path("--data", "prepared", "prepared dataset")
    """

    def __init__(self, doc: Optional[str], project_root: Path, params_help: str = "parameters file") -> None:
        # the docstring's first paragraph, unwrapped (argparse re-wraps it to the terminal)
        summary = " ".join((doc or "").strip().split("\n\n")[0].split()) or None
        super().__init__(description=summary)
        self.paths = pipeline_paths(project_root)
        self.add_argument("--params", type=Path, default=Path("params.yaml"),
                          help=f"{params_help} (default: %(default)s)")

    def add_path(self, flag: str, name: str, help: str) -> None:
        self.add_argument(flag, type=Path, default=self.paths[name],
                          help=f"{help} (default, from dvc.yaml: %(default)s)")
