"""Stage scripts share one command line shape: --params, then path flags defaulting to dvc.yaml's vars."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from medattn.errors import ParamError
from medattn.stage import StageParser

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE_SCRIPTS = sorted(p for p in (REPO_ROOT / "pipelines").glob("*.py"))


def test_path_flags_default_to_dvc_yaml_and_unknown_names_fail_in_one_line() -> None:
    parser = StageParser("DVC stage ``x``: does one thing\nover two lines.\n\nDetails.", REPO_ROOT)
    parser.add_path("--data", "prepared", "prepared dataset")
    args = parser.parse_args([])
    assert args.params == Path("params.yaml") and args.data == Path("data/prepared")
    assert parser.parse_args(["--data", "elsewhere"]).data == Path("elsewhere")
    assert parser.description == "DVC stage ``x``: does one thing over two lines."
    with pytest.raises(ParamError, match="no entry 'nowhere'"):
        parser.add_path("--other", "nowhere", "a path dvc.yaml does not name")


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: p.stem)
def test_every_stage_script_explains_itself_and_names_its_dvc_yaml_defaults(script: Path, monkeypatch, capsys) -> None:
    # in-process (the scripts' imports are this suite's anyway): `--help` exits 0 after printing
    spec = importlib.util.spec_from_file_location(f"stage_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script.name, "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code in (0, None)
    shown = capsys.readouterr().out
    assert "--params" in shown and "DVC stage" in shown
    written = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["vars"][0]["paths"]
    help_text = " ".join(shown.split())
    defaults = [value for value in written.values() if f"from dvc.yaml: {value})" in help_text]
    assert defaults, f"{script.name}: no path flag defaults to a dvc.yaml vars entry"
