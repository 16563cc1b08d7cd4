"""The `medattn` command line: help, registry commands, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


def _medattn(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDATTN_", "MLFLOW_"))}
    env["MEDATTN_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    return subprocess.run([sys.executable, "-m", "medattn.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = _medattn("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for command in ("mlflow-ui", "serve", "model", "feedback", "auth"):
        assert command in result.stdout


def test_unknown_model_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"model_name": "nobody"}}))
    result = _medattn("model", "info", tmp_path=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "'nobody'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_params_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": -1}}))
    result = _medattn("model", "promote", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "train.lr" in result.stderr and "Traceback" not in result.stderr
