"""The search's pieces without training: space checks, params application, GPU assignment,
storage choice, the journal heartbeat and retry, the report of a hand-made study."""

from __future__ import annotations

import time

import optuna
import pytest
import yaml

from medattn.config import ModelParams, Params, TrainParams, TuneParams, validate_params
from medattn.errors import ParamError
from medattn.tuning.space import apply_values, as_params_tree, dvc_exp_run_command, parse_search_space
from medattn.tuning.storage import HEARTBEAT_ATTR, StorageSettings, is_rdb_url, open_storage, redact
from medattn.tuning.workers import gpu_assignments, worker_environments

TRAIN = TrainParams(epochs=10)


def test_the_default_space_is_seed_001s_search() -> None:
    space = parse_search_space(TuneParams().space, TRAIN)
    assert space.names == ("model.K", "train.lambda_l1", "train.cutoff_epoch", "train.weight_decay")
    k, lam, cutoff, wd = space.dimensions
    assert k.choices == (32, 64, 128, 256) and wd.choices == (1e-3, 1e-4, 1e-5)
    assert (lam.low, lam.high, lam.log, lam.kind) == (1e-4, 1e-1, True, float)
    assert cutoff.kind is int and cutoff.choices is None


@pytest.mark.parametrize(("space", "mentions"), [
    ({"data": {"image_size": {"choices": [32]}}}, "tune.space.data"),
    ({"model": {"k": {"choices": [32]}}}, "tune.space.model.k"),
    ({"train": {"seed": {"choices": [0, 1]}}}, "cannot be searched"),
    ({"model": {"K": {"choices": [32, 6.5]}}}, "6.5"),
    ({"model": {"K": {"choices": []}}}, "non-empty"),
    ({"train": {"lr": {"low": 0.1, "high": 0.01}}}, "below high"),
    ({"train": {"lr": {"low": 0.0, "high": 0.01, "log": True}}}, "low > 0"),
    ({"train": {"lr": {"low": 0.001}}}, "both low and high"),
    ({"train": {"lr": {"low": 0.001, "high": 0.1, "step": 2}}}, "'step'"),
    ({"model": {"backbone": {"low": 1, "high": 2}}}, "give choices"),
    ({"train": {"cutoff_epoch": {"low": 1, "high": 11}}}, "train.epochs=10"),
    ([], "non-empty mapping"),
])
def test_a_bad_space_is_one_line_naming_the_key(space, mentions: str) -> None:
    with pytest.raises(ParamError, match="tune.space") as caught:
        parse_search_space(space, TRAIN)
    assert mentions in str(caught.value) and "\n" not in str(caught.value)


def test_loading_params_checks_the_space_but_not_the_cutoff_against_a_short_train() -> None:
    # a quick `train.epochs: 2` must not fail every stage over the search's E range
    short = Params(train=TrainParams(epochs=2, cutoff_epoch=1))
    assert validate_params(short) is short
    with pytest.raises(ParamError, match="cutoff_epoch must lie in"):
        parse_search_space(short.tune.space, short.train)
    with pytest.raises(ParamError, match="tune.objectives"):
        validate_params(Params(tune=TuneParams(objectives=["test_macro_f1"])))
    with pytest.raises(ParamError, match="grace_seconds"):
        validate_params(Params(tune=TuneParams(heartbeat_seconds=30, grace_seconds=30)))


def test_a_trials_values_become_fits_params_and_a_dvc_command() -> None:
    values = {"model.K": 64, "train.lambda_l1": 0.01, "train.cutoff_epoch": 3}
    model, train = apply_values(ModelParams(), TRAIN, values)
    assert (model.K, train.lambda_l1, train.cutoff_epoch, train.epochs) == (64, 0.01, 3, 10)
    assert as_params_tree(values) == {"model": {"K": 64}, "train": {"cutoff_epoch": 3, "lambda_l1": 0.01}}
    assert dvc_exp_run_command(values) == "dvc exp run -S model.K=64 -S train.cutoff_epoch=3 -S train.lambda_l1=0.01"


def test_a_suggested_value_has_the_params_type() -> None:
    space = parse_search_space(TuneParams().space, TRAIN)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    values = space.suggest(trial)
    assert isinstance(values["model.K"], int) and isinstance(values["train.cutoff_epoch"], int)
    assert 1e-4 <= values["train.lambda_l1"] <= 1e-1 and 1 <= values["train.cutoff_epoch"] <= 8


@pytest.mark.parametrize(("workers", "count", "visible", "expected"), [
    (3, 0, None, [None, None, None]),  # CPU host: nothing set
    (3, 2, None, ["0", "1", "0"]),  # round-robin
    (4, 2, "5,7", ["5", "7", "5", "7"]),  # within the GPUs this process may use
    (2, 1, "GPU-1a2b", ["GPU-1a2b", "GPU-1a2b"]),  # UUIDs (MIG) are kept as they are
])
def test_each_worker_gets_its_gpu_round_robin(workers, count, visible, expected) -> None:
    assert gpu_assignments(workers, count, visible) == expected


def test_worker_environments_keep_the_base_and_number_the_workers() -> None:
    envs = worker_environments(2, {"PATH": "/bin"}, device_count=0)
    assert envs == [{"PATH": "/bin", "MEDATTN_TUNE_WORKER": "0"}, {"PATH": "/bin", "MEDATTN_TUNE_WORKER": "1"}]
    assert worker_environments(2, {}, device_count=2)[1]["CUDA_VISIBLE_DEVICES"] == "1"


def test_storage_urls_are_told_from_paths_and_passwords_hidden() -> None:
    assert is_rdb_url("postgresql+psycopg://u:pw@db:5432/optuna") and is_rdb_url("sqlite:///x.db")
    assert not is_rdb_url("checkpoints/tune/study.journal")
    assert redact("postgresql+psycopg://u:secret@db/optuna") == "postgresql+psycopg://u:***@db/optuna"
    with pytest.raises(ParamError, match="not a database URL"):
        open_storage(StorageSettings("redis://localhost/0"))
    with pytest.raises(ParamError, match=r"u:\*\*\*@127.0.0.1"):
        open_storage(StorageSettings("postgresql+psycopg://u:secret@127.0.0.1:1/none"))


def test_a_journal_trial_without_heartbeat_is_failed_and_retried_with_its_params(tmp_path) -> None:
    settings = StorageSettings(str(tmp_path / "s.journal"), heartbeat_seconds=1, grace_seconds=2, max_retry=1)
    study = optuna.create_study(storage=open_storage(settings), study_name="s")
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage = study._storage
    old = time.time() - 10
    storage.set_trial_system_attr(dead._trial_id, HEARTBEAT_ATTR, old)
    storage.record_heartbeat(alive._trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == [dead._trial_id]

    from medattn.tuning.storage import fail_stale_trials_now

    fail_stale_trials_now(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert trials[alive.number].state == optuna.trial.TrialState.RUNNING
    retry = trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == trials[dead.number].params
    assert retry.system_attrs["retry_history"] == [dead.number]


def test_the_report_of_a_study_holds_best_params_a_command_and_counts(tmp_path) -> None:
    from medattn.tuning.report import write_study_report

    study = optuna.create_study(direction="maximize", study_name="hand-made")
    dist = {"model.K": optuna.distributions.CategoricalDistribution([32, 64]),
            "train.lambda_l1": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for k, lam, value in [(32, 0.01, 0.5), (64, 0.001, 0.8), (32, 0.05, 0.6)]:
        study.add_trial(optuna.create_trial(params={"model.K": k, "train.lambda_l1": lam}, distributions=dist,
                                            value=value, intermediate_values={1: value}))
    study.add_trial(optuna.create_trial(params={"model.K": 64, "train.lambda_l1": 0.1}, distributions=dist,
                                        state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.1}))
    summary = write_study_report(study, ["val_macro_f1"], tmp_path)
    assert summary["best_trial"] == 1 and summary["best_val_macro_f1"] == 0.8
    assert summary["trials"] == {"complete": 3, "pruned": 1, "failed": 0, "running": 0, "waiting": 0}
    text = (tmp_path / "best_params.yaml").read_text()
    assert yaml.safe_load(text) == {"model": {"K": 64}, "train": {"lambda_l1": 0.001}}
    assert "dvc exp run -S model.K=64 -S train.lambda_l1=0.001" in text
    rows = (tmp_path / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,val_macro_f1") and rows[4].split(",")[1] == "pruned"
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"optimization_history.png", "param_importances.png"}


def test_two_objectives_give_a_pareto_front_and_its_plot(tmp_path) -> None:
    from medattn.tuning.report import write_study_report

    study = optuna.create_study(directions=["maximize", "maximize"])
    dist = {"model.K": optuna.distributions.CategoricalDistribution([32, 64, 128])}
    for k, values in [(32, [0.9, 1.1]), (64, [0.7, 2.0]), (128, [0.6, 1.0])]:  # the last is dominated
        study.add_trial(optuna.create_trial(params={"model.K": k}, distributions=dist, values=values))
    summary = write_study_report(study, ["val_macro_f1", "attention_mass_ratio"], tmp_path)
    assert summary["pareto_front_size"] == 2 and summary["best_trial"] == 0
    front = yaml.safe_load((tmp_path / "candidates.yaml").read_text())
    assert [entry["trial"] for entry in front] == [0, 1] and front[1]["command"] == "dvc exp run -S model.K=64"
    assert (tmp_path / "figures" / "pareto_front.png").is_file()


def _medattn_tune(tmp_path, *args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEDATTN_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    return subprocess.run([sys.executable, "-m", "medattn.cli", "tune", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(("params", "mentions"), [
    ({"tune": {"space": {"train": {"lr": {"low": 1, "high": 0.1}}}}}, "tune.space.train.lr"),
    ({"train": {"epochs": 2, "cutoff_epoch": 1}}, "tune.space.train.cutoff_epoch"),  # the default E range
    ({}, "manifest"),  # no prepared data yet
])
def test_medattn_tune_fails_in_one_line_before_training(tmp_path, params, mentions: str) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = _medattn_tune(tmp_path, "--data", str(tmp_path / "missing"))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and mentions in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing created for a search that cannot run


def test_the_search_pipeline_uses_the_paths_of_dvc_yaml_vars() -> None:
    # pipelines/search/dvc.yaml cannot read ../../dvc.yaml's vars, so its paths are written out:
    # they must stay those vars (the stage script's defaults come from them)
    from pathlib import Path

    from medattn.stage import pipeline_paths

    root = Path(__file__).resolve().parents[2]
    paths = pipeline_paths(root)
    stage = yaml.safe_load((root / "pipelines/search/dvc.yaml").read_text())["stages"]["tune"]
    assert stage["wdir"] == "../.."
    assert (f"--data {paths['prepared']} --out {paths['tune_reports']} --checkpoints {paths['tune_checkpoints']}"
            in stage["cmd"])
    assert {str(paths["prepared"]), str(paths["validation"])} <= set(stage["deps"])
    outs = [next(iter(o)) for o in stage["outs"]] + [next(iter(m)) for m in stage["metrics"]]
    assert all(Path(o).parent in (paths["tune_reports"], paths["tune_reports"] / "figures") or
               Path(o) == paths["tune_reports"] / "figures" for o in outs)
    assert {Path(o).name for o in outs} == {"best_params.yaml", "trials.csv", "candidates.yaml", "figures",
                                             "best.json"}
