"""A newcomer's path: after `make demo`, a NEW shell, the README's next commands, as written.

The commands come from the README itself (the bash block under "What to type next, in a new
shell"), so README and test cannot drift. They run in a throwaway pipeline workspace (tiny
params) laid out like a checkout after `make setup`: its ``.venv`` is this test's virtualenv
(derived from ``sys.executable``; /work/main/.venv while developing, the checkout's ``.venv``
in CI). The shell starts from a clean environment, as a new terminal would: a HOME, a PATH
without the virtualenv, none of our variables.

Also here: ``.venv/bin/dvc repro`` without activation (works, or says in one line what to do),
params listed per key (``train.device`` reruns nothing), and every file a stage writes is one
``dvc.yaml`` declares (the paths are written once, in its ``vars``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from pipeline_workspace import MODEL_NAME, REPO_ROOT, VENV_BIN, PipelineWorkspace, make_workspace, registry_snapshot

from medattn.errors import ParamError
from medattn.stage import pipeline_paths

pytestmark = pytest.mark.e2e

NEXT_STEPS_HEADING = "### What to type next, in a new shell"
VENV = VENV_BIN.parent
# what each README command must show besides exiting 0 (a command added later only needs exit 0)
REQUIRED_COMMANDS = ("dvc repro", "dvc metrics show", "dvc plots show", "medattn model info")


def readme_next_steps() -> list[str]:
    """The commands of the first ```bash block after NEXT_STEPS_HEADING, comments stripped."""
    text = (REPO_ROOT / "README.md").read_text()
    assert NEXT_STEPS_HEADING in text, f"README.md lost its section {NEXT_STEPS_HEADING!r}"
    block = re.search(r"```bash\n(.*?)```", text.split(NEXT_STEPS_HEADING, 1)[1], re.DOTALL)
    assert block, f"no ```bash block under {NEXT_STEPS_HEADING!r} in README.md"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [command for command in commands if command]


def new_shell_env(home: Path, keep_pythonpath: bool = True) -> dict[str, str]:
    """A new terminal's environment: HOME, PATH without the virtualenv, nothing else of ours.

    PYTHONPATH is kept when set: it is how a git worktree under development puts its own code
    ahead of the editable install (unset in CI, where the install is the checkout itself).
    """
    venv_dirs = {VENV_BIN.resolve(), VENV_BIN.absolute()}
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep)
            if entry and Path(entry).resolve() not in venv_dirs and Path(entry).absolute() not in venv_dirs]
    env = {"HOME": str(home), "PATH": os.pathsep.join(path), "LANG": "C.UTF-8",
           # the test machine's few shared cores: the tiny model gains nothing from more threads
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if keep_pythonpath and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def in_new_shell(workspace: PipelineWorkspace, script: str, env: dict[str, str],
                 timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``script`` in bash (no profile, no rc files) from the workspace root, in ``env``."""
    return subprocess.run(["bash", "--noprofile", "--norc", "-c", script], cwd=workspace.root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.args[-1]!r} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def with_checkout_venv(workspace: PipelineWorkspace) -> PipelineWorkspace:
    """Give the workspace a ``.venv`` the way `make setup` leaves a checkout (a link to ours)."""
    (workspace.root / ".venv").symlink_to(VENV, target_is_directory=True)
    return workspace


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory) -> Iterator[tuple[PipelineWorkspace, dict[str, subprocess.CompletedProcess[str]]]]:
    """A workspace where the README's next commands ran, one new shell each: (workspace, results)."""
    commands = readme_next_steps()
    activation = [command for command in commands if command.startswith(("source ", ". "))]
    assert activation, f"the README's next steps never activate the virtualenv: {commands}"
    missing = [command for command in REQUIRED_COMMANDS if command not in commands]
    assert not missing, f"README next steps lost {missing}: {commands}"
    root = tmp_path_factory.mktemp("newcomer")
    workspace = with_checkout_venv(make_workspace(root / "checkout"))
    env = new_shell_env(root / "home")
    (root / "home").mkdir()
    precondition = in_new_shell(workspace, "command -v dvc medattn mlflow", env)
    assert precondition.stdout.strip() == "", f"the new shell already finds the tools: {precondition.stdout}"
    results = {}
    for command in commands:
        if command in activation:
            continue
        results[command] = in_new_shell(workspace, " && ".join([*activation, command]), env)
    yield workspace, results


def test_every_readme_next_step_works_in_a_new_shell(newcomer) -> None:
    _, results = newcomer
    for result in results.values():
        assert result.returncode == 0, describe(result)
        assert "Traceback" not in result.stderr, describe(result)


def test_readme_dvc_repro_builds_every_stage(newcomer) -> None:
    workspace, results = newcomer
    assert results["dvc repro"].returncode == 0, describe(results["dvc repro"])
    assert workspace.stale_stages() == set(), "dvc status still reports changes after the README's dvc repro"
    decision = workspace.read_json("reports/register/decision.json")
    assert registry_snapshot(workspace).aliases.get("champion") == str(decision["version"])


def test_readme_dvc_metrics_show_prints_the_test_metrics(newcomer) -> None:
    workspace, results = newcomer
    shown = results["dvc metrics show"]
    assert shown.returncode == 0, describe(shown)
    macro_f1 = workspace.read_json("reports/evaluate/metrics.json")["macro_f1"]
    assert "reports/evaluate/metrics.json" in shown.stdout and "macro_f1" in shown.stdout, shown.stdout
    shown_f1 = metrics_table_value(shown.stdout, "reports/evaluate/metrics.json", "macro_f1")
    # DVC rounds to 5 significant decimals and drops trailing zeros (0.4, not 0.40000).
    assert abs(float(shown_f1) - macro_f1) < 1e-4, f"test macro-F1 {macro_f1} shown as {shown_f1}:\n{shown.stdout}"


def metrics_table_value(table: str, path: str, column: str) -> str:
    """The cell of `dvc metrics show`'s table in row `path`, column `column`; cells never hold spaces."""
    lines = [line.split() for line in table.splitlines() if line.strip()]
    header = lines[0]
    row = next(cells for cells in lines[1:] if cells[0] == path)
    assert len(row) == len(header), f"{path}'s row does not line up with the header:\n{table}"
    return row[header.index(column)]


def test_readme_dvc_plots_show_writes_the_plots_page(newcomer) -> None:
    workspace, results = newcomer
    assert results["dvc plots show"].returncode == 0, describe(results["dvc plots show"])
    page = workspace.root / "dvc_plots" / "index.html"
    assert page.is_file(), f"dvc plots show wrote no {page}:\n{results['dvc plots show'].stdout}"
    html = page.read_text()
    for title in ("Algorithm 1 training curves", "Test confusion matrix", "Test F1 per class"):
        assert title in html, f"{title!r} missing from {page}"
    assert "attention_overlays.png" in html, "the evaluate figures are not on the plots page"


def test_readme_medattn_model_info_names_the_champion(newcomer) -> None:
    workspace, results = newcomer
    info = results["medattn model info"]
    assert info.returncode == 0, describe(info)
    shown = json.loads(info.stdout)
    champion = registry_snapshot(workspace).aliases["champion"]
    assert MODEL_NAME in info.stdout and str(shown["version"]) == champion, info.stdout


def test_unactivated_venv_dvc_repro_reruns_changed_stages(newcomer) -> None:
    """`.venv/bin/dvc repro` in a new shell with no activation: the stages still find medattn."""
    workspace, _ = newcomer
    workspace.set_params(**{"evaluate.topk_percent": 10})
    result = in_new_shell(workspace, ".venv/bin/dvc repro", new_shell_env(workspace.root.parent / "home"))
    assert result.returncode == 0, describe(result)
    assert "Running stage 'evaluate'" in result.stdout and "Running stage 'register'" in result.stdout, result.stdout
    assert "Running stage 'train'" not in result.stdout, result.stdout
    assert workspace.stale_stages() == set()


def test_dvc_repro_without_a_venv_says_what_to_do_in_one_line(tmp_path: Path) -> None:
    """No `.venv` and no medattn on the new shell's python3: one `error:` line, no traceback."""
    workspace = make_workspace(tmp_path / "checkout")
    (tmp_path / "home").mkdir()
    result = in_new_shell(workspace, f"{VENV_BIN / 'dvc'} repro",
                          new_shell_env(tmp_path / "home", keep_pythonpath=False), timeout=300)
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot import medattn" in errors[0] and "make setup" in errors[0], describe(result)
    assert not (workspace.root / "data").exists(), "a stage wrote outputs although it could not run"


def test_train_device_is_not_a_dependency_but_training_keys_are(newcomer) -> None:
    workspace, _ = newcomer
    original = workspace.params()
    try:
        assert workspace.stale_stages() == set()
        workspace.set_params(**{"train.device": "cuda"})
        assert workspace.stale_stages() == set(), "changing train.device makes dvc consider stages changed"
        workspace.set_params(**{"train.lr": original["train"]["lr"] * 2})
        # `dvc status` lists the directly changed stage; repro then reruns what depends on it
        assert "train" in workspace.stale_stages()
        assert "prepare" not in workspace.stale_stages() and "validate" not in workspace.stale_stages()
    finally:
        workspace.write_params(original)


def test_every_file_a_stage_writes_is_declared_in_dvc_yaml(newcomer) -> None:
    """The library names files inside the report folders; dvc.yaml must list each of them."""
    from dvc.repo import Repo

    workspace, _ = newcomer
    with Repo(str(workspace.root)) as repo:
        declared = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs]
    undeclared = [relative for relative in workspace.output_mtimes()
                  if not any((workspace.root / relative).is_relative_to(out) for out in declared)]
    assert undeclared == [], f"stages wrote files dvc.yaml does not declare: {undeclared}"


def test_stage_paths_come_from_dvc_yaml_vars(tmp_path: Path) -> None:
    written = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["vars"][0]["paths"]
    paths = pipeline_paths(REPO_ROOT)
    assert paths == {name: Path(value) for name, value in written.items()}
    # train writes the run reference into its report folder: evaluate and register must look there
    assert paths["run_ref"].parent == paths["train_reports"]
    with pytest.raises(ParamError, match="no entry 'nowhere'"):
        paths["nowhere"]
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ParamError, match=r"dvc\.yaml: no 'vars: - paths:' mapping"):
        pipeline_paths(tmp_path)
    with pytest.raises(ParamError, match="cannot read the pipeline definition"):
        pipeline_paths(tmp_path / "missing")
