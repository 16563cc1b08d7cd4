"""MLflow tracking + registry helpers against a real MLflow (one tmp sqlite db per module)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medattn.errors import ModelError, RegistryError
from medattn.registry import (
    CHALLENGER,
    CHAMPION,
    RunRef,
    as_image_batch,
    assign_challenger_and_gate,
    download_model_version,
    end_run,
    experiment_artifact_location,
    find_repo_root,
    get_model_version_info,
    get_run,
    log_bundle_model,
    log_epoch_metrics,
    log_metrics,
    mlflow_ui_command,
    pipeline_run,
    promote_challenger,
    read_run_ref,
    resolve_tracking_uri,
    resumed_run,
    rollback_champion,
    start_pipeline_run,
    write_run_ref,
)

URI_VARS = ("MEDATTN_TRACKING_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
DVC_VARS = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")  # set when DVC runs a stage


@pytest.fixture(autouse=True)
def no_uri_env(monkeypatch):
    for name in URI_VARS + DVC_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / ".git").mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    # Absolute sqlite path: 4 slashes. Migrations run once for the whole module.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"\x00weights\x01")
    (folder / "model_spec.json").write_text(json.dumps({"backbone": "small_cnn", "n_classes": 3}))
    return folder


# ---- tracking URI ----------------------------------------------------------------------------


def test_default_uri_is_sqlite_db_at_repo_root_from_a_subfolder(fake_repo: Path):
    sub = fake_repo / "pipelines" / "deep"
    sub.mkdir(parents=True)
    assert find_repo_root(sub) == fake_repo
    assert resolve_tracking_uri(None, sub) == f"sqlite:///{fake_repo}/mlflow.db"
    assert resolve_tracking_uri(None, sub).startswith("sqlite:////")


@pytest.mark.parametrize("temp_copy", [".dvc/tmp/exps/tmpabc", ".dvc/tmp/exps/run/workspace"])
def test_dvc_temp_experiment_copy_uses_the_real_repo(fake_repo: Path, temp_copy: str):
    copy = fake_repo / temp_copy
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")  # the copy looks like a repo of its own
    (copy / ".git").write_text("gitdir: elsewhere\n")
    assert find_repo_root(copy / "pipelines") == fake_repo
    assert resolve_tracking_uri(None, copy) == f"sqlite:///{fake_repo}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/m.db", copy) == f"sqlite:///{fake_repo}/runs/m.db"


def test_dvc_root_env_names_the_repo_of_the_working_directory(fake_repo: Path, tmp_path_factory, monkeypatch):
    executor_copy = tmp_path_factory.mktemp("executor")
    (executor_copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(executor_copy)
    assert find_repo_root() == executor_copy
    monkeypatch.setenv("DVC_ROOT", str(fake_repo))
    assert find_repo_root() == fake_repo
    assert resolve_tracking_uri() == f"sqlite:///{fake_repo}/mlflow.db"
    assert find_repo_root(executor_copy) == executor_copy  # an explicit start is taken literally


def test_uri_precedence_env_then_params_then_default(fake_repo: Path, monkeypatch):
    assert resolve_tracking_uri("http://params:5000", fake_repo) == "http://params:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-env:5000")
    assert resolve_tracking_uri("http://params:5000", fake_repo) == "http://mlflow-env:5000"
    monkeypatch.setenv("MEDATTN_TRACKING_URI", "postgresql://db/mlflow")
    assert resolve_tracking_uri("http://params:5000", fake_repo) == "postgresql://db/mlflow"
    monkeypatch.setenv("MEDATTN_TRACKING_URI", "   ")  # blank counts as unset
    assert resolve_tracking_uri(None, fake_repo) == "http://mlflow-env:5000"


def test_relative_local_paths_are_anchored_at_the_repo_root(fake_repo: Path):
    sub = fake_repo / "pipelines"
    sub.mkdir()
    assert resolve_tracking_uri("sqlite:///mlflow.db", sub) == f"sqlite:///{fake_repo}/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", sub) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("mlruns", sub) == str(fake_repo / "mlruns")


def test_artifact_location_and_ui_command(fake_repo: Path):
    uri = resolve_tracking_uri(None, fake_repo)
    assert experiment_artifact_location(uri, "medattn") == f"file://{fake_repo}/mlartifacts/medattn"
    assert experiment_artifact_location("http://server:5000", "medattn") is None
    command = mlflow_ui_command(None, fake_repo)
    assert command == (
        f"mlflow ui --backend-store-uri sqlite:///{fake_repo}/mlflow.db"
        f" --default-artifact-root file://{fake_repo}/mlartifacts"
    )
    assert "http://server:5000" in mlflow_ui_command("http://server:5000")
    assert not mlflow_ui_command("http://server:5000").startswith("mlflow ui")


# ---- runs ------------------------------------------------------------------------------------


def test_run_logs_params_epoch_metrics_and_final_metrics(tracking_uri: str, tmp_path: Path):
    from mlflow import MlflowClient

    params = {"train.lr": 0.002, "model.pretrained_weights": None, "data.root": "x" * 7000, "tags": [1, 2]}
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_macro_f1": 0.1 * e, "phase": "joint"} for e in (1, 2, 3)]
    with pipeline_run(params, "unit-runs", tracking_uri, run_name="r1", tags={"dvc.exp": "e1"}) as run_id:
        assert log_epoch_metrics(run_id, history, tracking_uri) == 6  # "phase" is not a number
        log_metrics(run_id, {"test_macro_f1": 0.5, "test": {"auc": 0.75}}, tracking_uri)
        (tmp_path / "metrics.json").write_text("{}")
        (tmp_path / "plots").mkdir()
        (tmp_path / "plots" / "curve.csv").write_text("a,b\n")
        from medattn.registry import log_artifacts

        log_artifacts(run_id, [tmp_path / "metrics.json", tmp_path / "plots"], tracking_uri, artifact_dir="eval")
    run = get_run(run_id, tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1" and run.data.tags["dvc.exp"] == "e1"
    assert run.data.params["train.lr"] == "0.002"
    assert run.data.params["model.pretrained_weights"] == "null"
    assert run.data.params["tags"] == "[1, 2]"
    assert len(run.data.params["data.root"]) == 6000 and run.data.params["data.root"].endswith("[truncated]")
    assert run.data.metrics == {"train_loss": pytest.approx(1 / 3), "val_macro_f1": pytest.approx(0.3),
                                "test_macro_f1": 0.5, "test.auc": 0.75}
    client = MlflowClient(tracking_uri)
    steps = [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, "val_macro_f1")]
    assert sorted(steps) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.endswith("/mlartifacts/unit-runs")
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert artifacts == {"eval/metrics.json", "eval/plots"}


def test_metric_history_as_columns_uses_position_as_step(tracking_uri: str, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "quick-owl")  # as under `dvc exp run`
    run_id = start_pipeline_run({}, "unit-runs", tracking_uri)
    log_epoch_metrics(run_id, {"loss": [0.9, np.float32(0.5)]}, tracking_uri)
    end_run(run_id, tracking_uri)
    run = get_run(run_id, tracking_uri)
    assert run.info.run_name == "quick-owl" and run.data.tags["dvc.exp_name"] == "quick-owl"
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, round(m.value, 4)) for m in history) == [(0, 0.9), (1, 0.5)]


def test_run_ref_round_trip_and_resume_across_stages(tracking_uri: str, tmp_path: Path):
    run_id = start_pipeline_run({"a": 1}, "unit-runs", tracking_uri)
    end_run(run_id, tracking_uri)  # the train stage's process ends here
    ref_path = write_run_ref(tmp_path / "models" / "mlflow_run.json", run_id, tracking_uri)
    assert [p.name for p in ref_path.parent.iterdir()] == ["mlflow_run.json"]  # no temp file left
    ref = read_run_ref(ref_path)
    assert ref == RunRef(run_id, tracking_uri)
    with resumed_run(ref):
        assert get_run(run_id, tracking_uri).info.status == "RUNNING"
        log_metrics(run_id, {"test_macro_f1": 0.9}, tracking_uri)
    assert get_run(run_id, tracking_uri).info.status == "FINISHED"
    with pytest.raises(ZeroDivisionError), resumed_run(ref):
        1 / 0  # noqa: B018
    assert get_run(run_id, tracking_uri).info.status == "FAILED"


def test_bad_run_refs_are_one_line_registry_errors(tracking_uri: str, tmp_path: Path):
    with pytest.raises(RegistryError, match="run the train stage first"):
        read_run_ref(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"run_id": "x"}')
    with pytest.raises(RegistryError, match=str(bad)):
        read_run_ref(bad)
    with pytest.raises(RegistryError, match="no run with id 'feedfacefeedface'"):
        with resumed_run(RunRef("feedfacefeedface", tracking_uri)):
            pass


# ---- registry --------------------------------------------------------------------------------


def _registered(tracking_uri: str, bundle: Path, model: str, f1: float | None) -> str:
    """One pipeline execution: a run with its test metric, the bundle logged and registered."""
    with pipeline_run({"data.source": "synthetic"}, "unit-registry", tracking_uri) as run_id:
        if f1 is not None:
            log_metrics(run_id, {"test_macro_f1": f1}, tracking_uri)
        version = log_bundle_model(run_id, bundle, model, tracking_uri=tracking_uri)
        assert get_run(run_id, tracking_uri).info.status == "RUNNING"  # logging kept the stage's run open
    return version


def test_gate_promotes_only_when_not_worse_and_rollback_restores(tracking_uri: str, bundle: Path):
    model = "gate-model"
    v1 = _registered(tracking_uri, bundle, model, 0.70)
    first = assign_challenger_and_gate(model, v1, tracking_uri=tracking_uri)
    assert (v1, first.promoted, first.champion_before, first.champion_after) == ("1", True, None, "1")
    assert "no champion yet" in first.reason

    v2 = _registered(tracking_uri, bundle, model, 0.60)
    second = assign_challenger_and_gate(model, v2, tracking_uri=tracking_uri)
    assert (second.promoted, second.metric, second.champion_metric) == (False, 0.60, 0.70)
    assert "champion stays version 1" in second.reason
    assert get_model_version_info(model, CHAMPION, tracking_uri=tracking_uri).version == "1"
    assert get_model_version_info(model, CHALLENGER, tracking_uri=tracking_uri).version == "2"

    v3 = _registered(tracking_uri, bundle, model, 0.70)  # equal is "not worse"
    third = assign_challenger_and_gate(model, v3, tracking_uri=tracking_uri)
    assert (third.promoted, third.champion_before, third.champion_after) == (True, "1", "3")
    champion = get_model_version_info(model, CHAMPION, tracking_uri=tracking_uri)
    assert champion.version == "3" and champion.aliases == (CHALLENGER, CHAMPION)
    assert json.dumps(third.to_dict())  # the register stage writes it as JSON

    restored = rollback_champion(model, tracking_uri=tracking_uri)
    assert (restored.version, restored.metric) == ("1", 0.70)
    assert get_model_version_info(model, CHAMPION, tracking_uri=tracking_uri).version == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback_champion(model, tracking_uri=tracking_uri)

    assert promote_challenger(model, tracking_uri=tracking_uri).version == "3"  # the expert accepts
    assert rollback_champion(model, tracking_uri=tracking_uri).version == "1"

    # Lower-is-better (e.g. a loss): version 2's 0.60 beats champion 1's 0.70.
    lower = assign_challenger_and_gate(model, "2", higher_is_better=False, tracking_uri=tracking_uri)
    assert (lower.promoted, lower.champion_after) == (True, "2")


def test_registered_version_is_tagged_and_downloads_the_bundle(tracking_uri: str, bundle: Path, tmp_path: Path):
    from mlflow import MlflowClient

    model = "download-model"
    version = _registered(tracking_uri, bundle, model, 0.8125)
    assert not any(os.environ.get(name) for name in URI_VARS)  # fluent URI state did not leak
    mv = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version(model, version)
    assert mv.status == "READY"
    assert mv.tags["test_macro_f1"] == "0.8125" and mv.tags["data_source"] == "synthetic"
    assert mv.tags["run_id"] == mv.run_id

    assign_challenger_and_gate(model, version, tracking_uri=tracking_uri)
    local, info = download_model_version(model, CHAMPION, tmp_path / "cache", tracking_uri=tracking_uri)
    assert sorted(p.name for p in local.iterdir()) == ["model.pt", "model_spec.json"]
    assert (local / "model.pt").read_bytes() == (bundle / "model.pt").read_bytes()
    assert json.loads((local / "model_spec.json").read_text())["n_classes"] == 3
    assert (info.name, info.version, info.run_id, info.metric) == (model, version, mv.run_id, 0.8125)
    assert CHAMPION in info.aliases
    again, _ = download_model_version(model, version, tmp_path / "cache", tracking_uri=tracking_uri)
    assert again == local
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".download-")]

    from mlflow.models import Model

    logged = Model.load(str(local.parents[1] / "MLmodel"))  # a real pyfunc model came down
    assert "python_function" in logged.flavors
    assert tuple(logged.signature.inputs.inputs[0].shape) == (-1, -1, -1, -1)


def test_logging_a_model_leaves_mlflows_global_uri_and_active_run_alone(
    tracking_uri: str, bundle: Path, tmp_path: Path, monkeypatch
):
    import mlflow

    # Someone else's fluent MLflow work in the same process (a notebook, another thread).
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other_uri)
    theirs = mlflow.start_run()
    try:
        version = _registered(tracking_uri, bundle, "bystander-model", 0.5)
        assert mlflow.get_tracking_uri() == other_uri
        assert mlflow.active_run().info.run_id == theirs.info.run_id
        assert get_run(theirs.info.run_id, other_uri).info.status == "RUNNING"
        assert mlflow.MlflowClient(other_uri).search_logged_models([theirs.info.experiment_id]) == []
    finally:
        mlflow.end_run()
    assert get_model_version_info("bystander-model", version, tracking_uri=tracking_uri).metric == 0.5


def test_unknown_model_alias_or_version_is_a_registry_error(tracking_uri: str, bundle: Path, tmp_path: Path):
    model = "lonely-model"
    _registered(tracking_uri, bundle, model, None)  # no metric, no gate yet: no aliases at all
    with pytest.raises(RegistryError, match="has no alias 'champion' \\(aliases: none\\)"):
        download_model_version(model, CHAMPION, tmp_path / "dst", tracking_uri=tracking_uri)
    with pytest.raises(RegistryError, match="has no version 9 \\(latest is 1\\)"):
        download_model_version(model, "9", tmp_path / "dst", tracking_uri=tracking_uri)
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        download_model_version("nope", CHAMPION, tmp_path / "dst", tracking_uri=tracking_uri)
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        assign_challenger_and_gate("nope", "1", tracking_uri=tracking_uri)
    with pytest.raises(RegistryError, match="no alias 'challenger'"):
        promote_challenger(model, tracking_uri=tracking_uri)
    assert get_model_version_info(model, "latest", tracking_uri=tracking_uri).metric is None
    assert not (tmp_path / "dst").exists()  # failed before creating anything


def test_unmeasured_challenger_does_not_replace_the_champion(tracking_uri: str, bundle: Path):
    model = "unmeasured-model"
    assign_challenger_and_gate(model, _registered(tracking_uri, bundle, model, 0.5), tracking_uri=tracking_uri)
    decision = assign_challenger_and_gate(
        model, _registered(tracking_uri, bundle, model, None), tracking_uri=tracking_uri
    )
    assert (decision.promoted, decision.metric, decision.champion_after) == (False, None, "1")
    assert "has no test_macro_f1" in decision.reason


def test_bundle_without_weights_is_rejected_before_anything_is_logged(tracking_uri: str, bundle: Path):
    (bundle / "model.pt").unlink()
    run_id = start_pipeline_run({}, "unit-registry", tracking_uri)
    with pytest.raises(ModelError, match="missing model.pt"):
        log_bundle_model(run_id, bundle, "never-model", tracking_uri=tracking_uri)
    with pytest.raises(RegistryError, match="no registered model 'never-model'"):
        get_model_version_info("never-model", "latest", tracking_uri=tracking_uri)


# ---- pyfunc input handling -------------------------------------------------------------------


def test_image_batch_accepts_arrays_single_images_and_an_image_column():
    import pandas as pd

    images = np.random.default_rng(0).random((2, 3, 8, 8))
    assert as_image_batch(images).shape == (2, 3, 8, 8) and as_image_batch(images).dtype == np.float32
    assert as_image_batch(images[0]).shape == (1, 3, 8, 8)
    frame = pd.DataFrame({"image": list(images)})
    np.testing.assert_allclose(as_image_batch(frame), images.astype(np.float32))
    with pytest.raises(ModelError, match="shape"):
        as_image_batch(np.zeros((8, 8)))
    with pytest.raises(ModelError, match="one column"):
        as_image_batch(pd.DataFrame({"a": [1.0], "b": [2.0]}))


def test_registered_real_bundle_loads_as_pyfunc_and_predicts_probabilities(tracking_uri: str, tmp_path: Path):
    import mlflow.pyfunc
    import torch

    from medattn.models.bundle import save_bundle
    from medattn.models.factory import ModelSpec, create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = ModelSpec(backbone="small_cnn", attention="none", num_classes=3, image_size=16,
                     class_names=("a", "b", "c"))
    bundle_dir = save_bundle(create_model(spec), spec, tmp_path / "real-bundle")
    run_id = start_pipeline_run({}, "unit-registry", tracking_uri)
    version = log_bundle_model(run_id, bundle_dir, "pyfunc-model", tracking_uri=tracking_uri, metric=0.5)
    local, _ = download_model_version("pyfunc-model", version, tmp_path / "cache", tracking_uri=tracking_uri)

    model = mlflow.pyfunc.load_model(str(local.parents[1]))
    images = np.random.default_rng(1).random((2, 3, 16, 16)).astype(np.float32)
    probabilities = model.predict(images)
    assert probabilities.shape == (2, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ModelError, match=r"\(B, 3, 16, 16\)"):
        model.predict(np.zeros((1, 3, 8, 8), np.float32))


def test_register_stage_writes_the_gate_decision(tracking_uri: str, bundle: Path, tmp_path: Path, monkeypatch):
    from medattn.config import MlflowParams, Params
    from medattn.feedback.audit import list_events
    from medattn.feedback.store import FeedbackStore
    from medattn.registry import register_bundle

    monkeypatch.setenv("MEDATTN_FEEDBACK_DB", f"sqlite:///{tmp_path / 'audit.db'}")
    monkeypatch.setenv("MEDATTN_ACTOR", "ci-pipeline")

    params = Params(mlflow=MlflowParams(model_name="stage-model"))
    decisions = []
    for f1 in (0.8, 0.7):
        (bundle / "model.pt").write_bytes(f"weights trained to {f1}".encode())  # a different model each time
        run_id = start_pipeline_run(params.flat(), "unit-registry", tracking_uri)
        end_run(run_id, tracking_uri)
        ref = write_run_ref(tmp_path / "mlflow_run.json", run_id, tracking_uri)
        metrics = tmp_path / "metrics.json"
        metrics.write_text(json.dumps({"macro_f1": f1, "accuracy": 0.9}))
        decisions.append(register_bundle(params, bundle, metrics, ref, tmp_path / "register" / "decision.json"))
        assert get_run(run_id, tracking_uri).info.status == "FINISHED"
    first, second = decisions
    assert (first["version"], first["promoted"], first["run_id"] != second["run_id"]) == ("1", True, True)
    assert (second["version"], second["promoted"], second["champion_after"]) == ("2", False, "1")
    assert json.loads((tmp_path / "register" / "decision.json").read_text()) == second
    assert get_model_version_info("stage-model", tracking_uri=tracking_uri).metric == 0.8
    with FeedbackStore(f"sqlite:///{tmp_path / 'audit.db'}") as store:  # the gate's promotion is audited, once
        assert [(e.actor, e.action, e.from_version, e.to_version) for e in list_events(store)] == [
            ("ci-pipeline", "promote", None, "1")]

    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(RegistryError, match="'macro_f1' must be a finite number"):
        register_bundle(params, bundle, tmp_path / "metrics.json", ref, tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_register_stage_reuses_the_version_of_an_identical_bundle(tracking_uri: str, bundle: Path, tmp_path: Path,
                                                                  monkeypatch):
    monkeypatch.setenv("MEDATTN_FEEDBACK_DB", f"sqlite:///{tmp_path / 'audit.db'}")
    from medattn.config import MlflowParams, Params
    from medattn.registry import register_bundle

    params = Params(mlflow=MlflowParams(model_name="reuse-model"))
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"macro_f1": 0.9}))
    decisions = []
    for _ in range(2):  # e.g. only an evaluate param changed: same weights, register re-runs
        run_id = start_pipeline_run(params.flat(), "unit-registry", tracking_uri)
        end_run(run_id, tracking_uri)
        ref = write_run_ref(tmp_path / "mlflow_run.json", run_id, tracking_uri)
        decisions.append(register_bundle(params, bundle, metrics, ref, tmp_path / "decision.json"))
    assert [d["version"] for d in decisions] == ["1", "1"]
    assert [d["reused_existing_version"] for d in decisions] == [False, True]
    (bundle / "model.pt").write_bytes(b"retrained")
    ref = write_run_ref(tmp_path / "mlflow_run.json", start_pipeline_run(params.flat(), "unit-registry", tracking_uri),
                        tracking_uri)
    assert register_bundle(params, bundle, metrics, ref, tmp_path / "decision.json")["version"] == "2"
