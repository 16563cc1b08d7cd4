"""The Optuna search end to end: through DVC, two workers on one journal, PostgreSQL, a killed study.

One workspace (module scope) holds the tiny prepared data; every test runs its own study
(its own storage or study name) on it. Trials are tiny (96 images of 32 px, 2-3 epochs) and
the space holds a learning rate too small to learn anything in three epochs, so the median
pruner has a trial to stop; everything is seeded and deterministic on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from pipeline_workspace import VENV_BIN, PipelineWorkspace, make_workspace, stage_env, tiny_params  # noqa: E402
from postgres_server import postgres_server, postgres_url  # noqa: E402,F401,F811  (fixtures)

pytestmark = pytest.mark.e2e

SEARCH_PIPELINE = "pipelines/search/dvc.yaml"
TRIALS = 4
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SPACE = {
    "model": {"K": {"choices": [2, 4]}},
    "train": {
        "lambda_l1": {"low": 0.0001, "high": 0.1, "log": True},
        "cutoff_epoch": {"low": 1, "high": 2},
        # 1e-6 learns nothing in 3 epochs: a trial the pruner must stop
        "lr": {"choices": [0.000001, 0.02]},
    },
}
TUNE_PARAMS = {
    "data.synthetic.n_images": 96, "train.epochs": 3, "train.cutoff_epoch": 2, "train.lr": 0.02,
    "tune.n_trials": TRIALS, "tune.space": SPACE, "tune.pruner.n_startup_trials": 1,
    "tune.pruner.n_warmup_steps": 0,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> PipelineWorkspace:
    ws = make_workspace(tmp_path_factory.mktemp("tune") / "ws", tiny_params(**TUNE_PARAMS), with_search=True)
    ws.dvc("repro", "validate")
    return ws


def _medattn(ws: PipelineWorkspace, *args: str, env: dict | None = None, timeout: float = 600):
    command = [str(VENV_BIN / "python"), "-m", "medattn.cli", "tune", *args]
    result = subprocess.run(command, cwd=ws.root, env=env or stage_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _mlflow_runs(ws: PipelineWorkspace) -> list[dict]:
    """Every run with its tags, read from the workspace's tracking db directly (not through our helpers)."""
    with sqlite3.connect(ws.db_path) as db:
        runs = [{"id": r[0], "status": r[1]} for r in db.execute("SELECT run_uuid, status FROM runs")]
        for run in runs:
            run["tags"] = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run["id"],)))
            run["metric_steps"] = db.execute(
                "SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key = 'val_macro_f1'", (run["id"],)).fetchone()[0]
    return runs


def test_tiny_study_through_dvc_prunes_writes_best_params_and_nested_runs(workspace: PipelineWorkspace) -> None:
    out = workspace.dvc("repro", SEARCH_PIPELINE)
    assert "Running stage 'pipelines/search/dvc.yaml:tune'" in out.stdout

    best = workspace.read_json("reports/tune/best.json")
    trials = [line.split(",") for line in (workspace.root / "reports/tune/trials.csv").read_text().splitlines()[1:]]
    states = [row[1] for row in trials]
    assert states.count("pruned") >= 1, trials
    assert states.count("complete") + states.count("pruned") >= TRIALS
    assert best["trials"]["pruned"] == states.count("pruned")
    best_params = yaml.safe_load((workspace.root / "reports/tune/best_params.yaml").read_text())
    assert set(best_params) == {"model", "train"} and best_params["train"]["lr"] in (0.000001, 0.02)
    assert best_params["model"]["K"] == best["params"]["model.K"]
    assert f"dvc exp run -S model.K={best_params['model']['K']}" in (
        workspace.root / "reports/tune/best_params.yaml").read_text()
    # every file the stage wrote is one dvc.yaml declares
    declared = {"best_params.yaml", "best.json", "trials.csv", "candidates.yaml", "figures"}
    assert {p.name for p in (workspace.root / "reports/tune").iterdir()} == declared
    figures = {p.name for p in (workspace.root / "reports/tune/figures").iterdir()}
    assert {"optimization_history.png", "param_importances.png"} <= figures

    # dvc sees the best params and value as metrics of the search
    shown = json.loads(workspace.dvc("metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]["reports/tune/best.json"]["data"]
    assert metrics["params"]["model.K"] == best_params["model"]["K"]
    assert metrics["best_val_macro_f1"] == pytest.approx(best["best_val_macro_f1"])
    assert "best_val_macro_f1" in workspace.dvc("exp", "show", "--no-pager", "--csv").stdout.splitlines()[0]

    runs = _mlflow_runs(workspace)
    parents = [r for r in runs if r["tags"].get("stage") == "tune"]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["id"]]
    assert len(children) == len(trials)
    assert sorted(r["tags"]["state"] for r in children) == sorted(states)
    for child in children:
        assert child["metric_steps"] >= 1  # per-epoch curve
    pruned_runs = [r for r in children if r["tags"]["state"] == "pruned"]
    assert all(r["metric_steps"] < 3 or r["status"] == "FINISHED" for r in pruned_runs)

    # nothing changed: DVC does not rerun the search
    again = workspace.dvc("repro", SEARCH_PIPELINE)
    assert "Running stage" not in again.stdout


def test_two_worker_processes_share_one_journal_study(workspace: PipelineWorkspace) -> None:
    params = workspace.params()
    params["tune"]["n_trials"] = 2
    params["train"].update({"epochs": 2, "cutoff_epoch": 1})
    params["tune"]["space"]["train"]["cutoff_epoch"] = {"low": 1, "high": 2}
    (workspace.root / "two-params.yaml").write_text(yaml.safe_dump(params))
    # one thread per worker: two workers share this machine's two cores
    env = {**stage_env(), "MEDATTN_TRAIN_THREADS": "1"}
    _medattn(workspace, "--params", "two-params.yaml", "--workers", "2", "--study-name", "two-workers",
             "--out", "reports/two", env=env, timeout=900)
    study = optuna.load_study(study_name="two-workers", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workspace.root / "checkpoints/tune/study.journal"))))
    finished = [t for t in study.trials if t.state in FINISHED]
    assert 2 <= len(finished) <= 3  # a second worker may start one more as the count is reached
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in study.trials}
    pids = {t.user_attrs["worker"].split(":")[1] for t in study.trials}
    assert workers == {"0", "1"} and len(pids) == 2
    assert os.getpid() not in {int(p) for p in pids}  # separate processes, not this one
    assert (workspace.root / "reports/two/best_params.yaml").is_file()


def test_a_worker_against_postgresql(workspace: PipelineWorkspace, postgres_url: str) -> None:  # noqa: F811
    from medattn.config import load_params
    from medattn.tuning.search import SearchRequest, run_search

    params_path = workspace.root / "pg-params.yaml"
    params = workspace.params()
    params["tune"].update({"n_trials": 2, "study_name": "on-postgres"})
    params["train"]["epochs"] = 2
    params["mlflow"]["tracking_uri"] = workspace.tracking_uri
    params_path.write_text(yaml.safe_dump(params))
    outcome = run_search(SearchRequest(load_params(params_path), params_path, workspace.root / "data/prepared",
                                       workspace.root / "reports/pg", workspace.root / "checkpoints/pg",
                                       storage=postgres_url, progress=False))
    # read back with Optuna's own storage: the study and its trials are in PostgreSQL
    study = optuna.load_study(study_name="on-postgres", storage=postgres_url)
    assert study._storage._backend.engine.dialect.name == "postgresql"
    assert len([t for t in study.trials if t.state.is_finished()]) >= 2
    assert study.user_attrs["mlflow_parent_run_id"] == outcome.parent_run_id
    assert not (workspace.root / "checkpoints/pg").exists()  # no journal file was used


def test_a_killed_study_resumes_and_retries_the_killed_trial(workspace: PipelineWorkspace) -> None:
    journal = workspace.root / "checkpoints/kill/study.journal"
    params = workspace.params()
    params["tune"].update({"n_trials": 3, "study_name": "killed", "heartbeat_seconds": 1, "grace_seconds": 3})
    params["tune"]["pruner"]["n_startup_trials"] = 100  # no pruning: the retried trial runs to the end
    # 12 epochs: a trial stays mid-way for seconds, so the poll below finds one (3 epochs of
    # 96 tiny images can all pass between two polls, and the study ends before the kill)
    params["train"]["epochs"] = 12
    (workspace.root / "kill-params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", "kill-params.yaml", "--checkpoints", "checkpoints/kill", "--out", "reports/kill"]
    command = [str(VENV_BIN / "python"), "-m", "medattn.cli", "tune", *args]
    process = subprocess.Popen(command, cwd=workspace.root, env=stage_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    storage = None
    killed_number = None
    try:
        for _ in range(3000):  # at most ten minutes, polled five times a second
            if process.poll() is not None:
                pytest.fail(f"the search ended (exit {process.returncode}) before a trial was mid-way")
            if journal.exists():
                storage = storage or optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(str(journal)))
                try:
                    trials = optuna.load_study(study_name="killed", storage=storage).trials
                except KeyError:
                    trials = []
                running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]
                if running:  # at least one epoch reported, more to come: mid-trial
                    killed_number = running[0].number
                    break
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert killed_number is not None
    time.sleep(4)  # past grace_seconds: the dead worker's heartbeat is stale

    _medattn(workspace, *args)
    study = optuna.load_study(study_name="killed", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    by_number = {t.number: t for t in study.trials}
    killed = by_number[killed_number]
    assert killed.state == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials if (t.system_attrs.get("retry_history") or [None])[-1] == killed_number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) >= 3
    # the killed trial's MLflow run was closed as failed when its retry started
    runs = {r["id"]: r for r in _mlflow_runs(workspace)}
    dead_run = runs[killed.user_attrs["mlflow_run_id"]]
    assert dead_run["tags"]["state"] == "failed" and dead_run["status"] == "FAILED"
    assert runs[retries[0].user_attrs["mlflow_run_id"]]["tags"]["optuna.retry_of"] == str(killed_number)
