"""A throwaway git + DVC copy of this repository's pipeline, for end-to-end tests.

``make_workspace(tmp_path)`` copies what ``dvc repro`` needs (dvc.yaml, pipelines/, the DVC
config, a tiny params.yaml) into a fresh git repo and commits it. ``medattn/`` is copied too
because dvc.yaml lists its folders as dependencies, but the stage scripts import ``medattn``
from this repository: PYTHONPATH names its root, so a test always runs the checkout it lives
in, whichever checkout the virtualenv's editable install points at.

Commands run with this virtualenv's ``bin`` first on PATH and no tracking URI in the
environment, so every stage logs into the workspace's own ``mlflow.db`` (the default).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MODEL_NAME = "medattn-tiny"
STAGES = ("prepare", "validate", "train", "evaluate", "register")

# The demo pipeline shrunk until a full `dvc repro` takes seconds, not minutes.
TINY_PARAMS: dict[str, Any] = {
    "data": {
        "source": "synthetic",
        "root": None,
        "image_size": 32,
        "synthetic": {"preset": "easy", "n_images": 48, "seed": 2024},
    },
    "validate": {"min_class_ratio": 0.3, "expected_channels": 3},
    "model": {"backbone": "small_cnn", "attention": "global_pixel", "K": 4},
    "train": {"epochs": 2, "cutoff_epoch": 1, "lr": 0.002, "batch_size": 16, "seed": 0,
              "device": "cpu"},
    "evaluate": {"overlay_count": 2, "topk_percent": 5},
    "mlflow": {"tracking_uri": None, "experiment": "medattn-e2e", "model_name": MODEL_NAME},
}

# Copied from the repository into every workspace (paths relative to its root).
_COPIED_FILES = ("dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")
_COPIED_DIRS = ("pipelines", "medattn")
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "medattn e2e", "GIT_AUTHOR_EMAIL": "e2e@medattn.invalid",
    "GIT_COMMITTER_NAME": "medattn e2e", "GIT_COMMITTER_EMAIL": "e2e@medattn.invalid",
}


def tiny_params(**dotted: Any) -> dict[str, Any]:
    """The repository's params.yaml shrunk by TINY_PARAMS, then ``dotted`` overrides.

    ``tiny_params(**{"train.lr": -1})``. Starting from the real file keeps every key a user
    sees, so the tests notice when a documented key stops being accepted.
    """
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for key, value in {**flatten_params(TINY_PARAMS), **dotted}.items():
        set_dotted(params, key, value)
    return params


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``: the key spelling of MLflow and `dvc -S`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(flatten_params(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(p, "train.epochs", 3)`` sets ``p["train"]["epochs"]``, creating mappings on the way."""
    *parents, leaf = key.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def ran_stages(dvc_stdout: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '(\w+)'", dvc_stdout))


def stage_env() -> dict[str, str]:
    """The environment of every command: our virtualenv first, this checkout's medattn, default
    tracking URI, no telemetry."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEDATTN_TRACKING_URI", "MLFLOW_TRACKING_URI", "DVC_ROOT", "PYTHONPATH")}
    env.update(_GIT_IDENTITY)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO_ROOT),
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # the test machine has 2 shared cores; the tiny model gains nothing from more threads
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclass(frozen=True)
class PipelineWorkspace:
    """A git repo + DVC project holding the pipeline; ``run`` executes commands inside it."""

    root: Path

    @property
    def db_path(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    def run(self, *command: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the workspace; with ``check`` a non-zero exit fails with its output."""
        result = subprocess.run(command, check=False, cwd=self.root, env=stage_env(), capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                                 f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        return result

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(str(VENV_BIN / "dvc"), *args, check=check)

    def stage(self, name: str, *args: str) -> StageOutcome:
        """Run one stage script in a subprocess, the way dvc.yaml does (never raises on failure)."""
        return StageOutcome.of(self.run(sys.executable, f"pipelines/{name}.py", *args, check=False))

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("git", *args)

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: Mapping[str, Any]) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))

    def set_params(self, **dotted: Any) -> None:
        """Change some params in place: ``ws.set_params(**{"train.epochs": 3})``."""
        params = self.params()
        for key, value in dotted.items():
            set_dotted(params, key, value)
        self.write_params(params)

    def stale_stages(self) -> set[str]:
        """Stages ``dvc status`` reports as changed (empty when the pipeline is up to date)."""
        status = json.loads(self.dvc("status", "--json").stdout or "{}")
        return set(status)

    def output_mtimes(self) -> dict[str, int]:
        """``{relative path: mtime_ns}`` of every file the stages wrote (data/, models/, reports/)."""
        return {str(path.relative_to(self.root)): path.stat().st_mtime_ns
                for folder in ("data", "models", "reports") if (self.root / folder).is_dir()
                for path in sorted((self.root / folder).rglob("*")) if path.is_file()}

    def files(self) -> set[str]:
        """Every file in the workspace outside git's and DVC's own folders (to spot leftovers)."""
        skipped = (".git", ".dvc")
        return {str(path.relative_to(self.root)) for path in self.root.rglob("*")
                if path.is_file() and path.relative_to(self.root).parts[0] not in skipped}

    def read_json(self, relative: str) -> Any:
        return json.loads((self.root / relative).read_text())

    def run_count(self) -> int:
        """MLflow runs in the workspace tracking db (0 without a db)."""
        if not self.db_path.exists():
            return 0
        with sqlite3.connect(self.db_path) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0


@dataclass(frozen=True)
class StageOutcome:
    """How a stage ended, whether it ran in a subprocess or in the test process."""

    exit_code: int
    stdout: str
    stderr: str

    @classmethod
    def of(cls, result: subprocess.CompletedProcess[str]) -> StageOutcome:
        return cls(result.returncode, result.stdout, result.stderr)


def assert_one_line_error(outcome: StageOutcome, *mentions: str) -> str:
    """A user-facing failure: non-zero exit, no traceback, one ``error:`` line naming ``mentions``.

    Progress bars (on stderr too) may come before it; the error line must be the last thing
    printed. Returns that line.
    """
    assert outcome.exit_code != 0, f"exit code 0\n--- stdout\n{outcome.stdout}\n--- stderr\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line on stderr, got:\n{outcome.stderr}"
    assert lines[-1] == errors[0], f"the error line is not the last one on stderr:\n{outcome.stderr}"
    for mention in mentions:
        assert mention in errors[0], f"{mention!r} not named in: {errors[0]}"
    return errors[0]


@dataclass(frozen=True)
class RegistrySnapshot:
    """The workspace registry's model MODEL_NAME at one moment: its versions and aliases."""

    versions: tuple[str, ...]
    aliases: dict[str, str]
    version_runs: dict[str, str]


def registry_snapshot(workspace: PipelineWorkspace) -> RegistrySnapshot:
    """Read the registry with MLflow's own client (not our helpers, which are under test)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=workspace.tracking_uri, registry_uri=workspace.tracking_uri)
    found = client.search_model_versions(f"name = '{MODEL_NAME}'")
    versions = tuple(sorted((str(v.version) for v in found), key=int))
    aliases = dict(client.get_registered_model(MODEL_NAME).aliases) if versions else {}
    return RegistrySnapshot(versions, {k: str(v) for k, v in aliases.items()},
                            {str(v.version): v.run_id for v in found})


def make_workspace(path: Path, params: Mapping[str, Any] | None = None,
                   with_search: bool = False) -> PipelineWorkspace:
    """Copy the pipeline into ``path`` (created), write ``params`` (default ``tiny_params()``), git-commit it.

    The opt-in search pipeline (``pipelines/search/dvc.yaml``) is copied only ``with_search``:
    `dvc status` lists every dvc.yaml, and the default pipeline's tests expect its stages alone.
    """
    path.mkdir(parents=True, exist_ok=True)
    for name in _COPIED_FILES:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    skipped = ("__pycache__", "*.pyc") if with_search else ("__pycache__", "*.pyc", "search")
    for name in _COPIED_DIRS:
        shutil.copytree(REPO_ROOT / name, path / name, ignore=shutil.ignore_patterns(*skipped))
    workspace = PipelineWorkspace(path)
    workspace.write_params(params if params is not None else tiny_params())
    workspace.git("init", "--quiet", "--initial-branch=main")
    workspace.git("add", "--all")
    workspace.git("commit", "--quiet", "--message", "pipeline workspace")
    return workspace
