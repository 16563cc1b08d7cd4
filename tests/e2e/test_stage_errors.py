"""Bad input to the pipeline stages: one ``error:`` line, non-zero exit, nothing half written.

Most cases run the stage script in this process (``runpy`` with the workspace as working
directory and its own argv): starting Python + torch + MLflow per case would cost seconds
each. A few cases run real subprocesses to check the process boundary itself (exit status,
what reaches stderr), and one runs `dvc repro` on a leaky dataset.
"""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image
from pipeline_workspace import (
    STAGES,
    PipelineWorkspace,
    StageOutcome,
    assert_one_line_error,
    make_workspace,
    registry_snapshot,
    tiny_params,
)

from tests.fixtures.real_layouts import corrupt_image, make_idrid, make_imagefolder

pytestmark = pytest.mark.e2e

RunStage = Callable[..., StageOutcome]


@pytest.fixture
def run_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> RunStage:
    """``run(workspace, stage, *args)``: execute ``pipelines/<stage>.py`` as ``__main__`` here."""

    def run(workspace: PipelineWorkspace, stage: str, *args: str) -> StageOutcome:
        monkeypatch.chdir(workspace.root)
        monkeypatch.setattr(sys, "argv", [f"pipelines/{stage}.py", *args])
        for name in ("MEDATTN_TRACKING_URI", "MLFLOW_TRACKING_URI", "DVC_ROOT"):
            monkeypatch.delenv(name, raising=False)
        capsys.readouterr()
        try:
            runpy.run_path(str(workspace.root / "pipelines" / f"{stage}.py"), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception as exc:  # what the user would get as a traceback
            pytest.fail(f"pipelines/{stage}.py raised {type(exc).__name__}: {exc}")
        captured = capsys.readouterr()
        return StageOutcome(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> PipelineWorkspace:
    """A workspace where nothing has run yet (every case must leave it that way)."""
    return make_workspace(tmp_path_factory.mktemp("errors") / "ws")


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory) -> PipelineWorkspace:
    """A workspace whose prepare stage has run (tiny synthetic set); copied, never used directly."""
    workspace = make_workspace(tmp_path_factory.mktemp("prepared") / "ws")
    outcome = workspace.stage("prepare")
    assert outcome.exit_code == 0, outcome.stderr
    return workspace


@pytest.fixture
def prepared(prepared_template: PipelineWorkspace, tmp_path: Path) -> PipelineWorkspace:
    shutil.copytree(prepared_template.root, tmp_path / "ws", symlinks=True)
    return PipelineWorkspace(tmp_path / "ws")


def fails_cleanly(run: RunStage, workspace: PipelineWorkspace, stage: str, *mentions: str,
                  args: tuple[str, ...] = ()) -> str:
    """Run ``stage``; it must fail with one error line and leave the workspace's files as they were."""
    files_before = workspace.files()
    error = assert_one_line_error(run(workspace, stage, *args), *mentions)
    assert workspace.files() == files_before, f"{stage} left files behind: {workspace.files() - files_before}"
    return error


# ---- parameters -----------------------------------------------------------------------------

BAD_PARAMS: dict[str, tuple[dict[str, Any], str]] = {
    "negative lr": ({"train.lr": -0.01}, "train.lr"),
    "cutoff after the last epoch": ({"train.cutoff_epoch": 5}, "train.cutoff_epoch"),
    "unknown key": ({"train.learning_rate": 0.01}, "train.learning_rate"),
    "wrong type": ({"train.epochs": "two"}, "train.epochs"),
    "unknown backbone": ({"model.backbone": "resnet9000"}, "model.backbone"),
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", BAD_PARAMS, ids=str)
def test_every_stage_rejects_bad_params_before_doing_anything(
        run_in_process: RunStage, bare: PipelineWorkspace, stage: str, case: str) -> None:
    overrides, key = BAD_PARAMS[case]
    bare.write_params(tiny_params(**overrides))
    error = fails_cleanly(run_in_process, bare, stage, key)
    assert error.startswith("error: params.yaml:")


def test_a_missing_params_file_is_named(run_in_process: RunStage, bare: PipelineWorkspace) -> None:
    bare.write_params(tiny_params())
    fails_cleanly(run_in_process, bare, "train", "elsewhere.yaml", args=("--params", "elsewhere.yaml"))


# ---- data -----------------------------------------------------------------------------------


def test_prepare_names_a_missing_data_folder(run_in_process: RunStage, bare: PipelineWorkspace,
                                             tmp_path: Path) -> None:
    nowhere = tmp_path / "no-such-dataset"
    bare.write_params(tiny_params(**{"data.source": "imagefolder", "data.root": str(nowhere)}))
    fails_cleanly(run_in_process, bare, "prepare", str(nowhere))


def test_prepare_names_a_truncated_image_and_writes_no_dataset(
        run_in_process: RunStage, bare: PipelineWorkspace, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "raw", {"benign": 6, "malignant": 6})
    broken = root / "malignant" / "img_4.png"
    corrupt_image(broken)
    bare.write_params(tiny_params(**{"data.source": "imagefolder", "data.root": str(root)}))
    fails_cleanly(run_in_process, bare, "prepare", str(broken))


def test_prepare_names_a_missing_idrid_label_file(run_in_process: RunStage, bare: PipelineWorkspace,
                                                  tmp_path: Path) -> None:
    grades = {f"IDRiD_{i:02d}": (i % 3, 0) for i in range(1, 10)}
    base = make_idrid(tmp_path / "raw", dict(list(grades.items())[:6]), dict(list(grades.items())[6:]))
    labels = base / "2. Groundtruths"
    (labels / "a. IDRiD_Disease Grading_Training Labels.csv").unlink()
    bare.write_params(tiny_params(**{"data.source": "idrid", "data.root": str(tmp_path / "raw")}))
    fails_cleanly(run_in_process, bare, "prepare", str(labels), "Training Labels")


@pytest.mark.parametrize("stage", ["validate", "train"])
def test_stages_after_prepare_need_the_prepared_dataset(run_in_process: RunStage, bare: PipelineWorkspace,
                                                        stage: str) -> None:
    bare.write_params(tiny_params())
    fails_cleanly(run_in_process, bare, stage, "data/prepared", "run the prepare stage first")


# ---- out of order: no run reference, no model -----------------------------------------------


def test_evaluate_before_train_names_the_missing_run_reference(run_in_process: RunStage,
                                                               bare: PipelineWorkspace) -> None:
    bare.write_params(tiny_params())
    fails_cleanly(run_in_process, bare, "evaluate", "reports/train/mlflow_run.json", "train stage first")


def test_register_before_evaluate_names_the_missing_metrics(run_in_process: RunStage,
                                                            bare: PipelineWorkspace) -> None:
    bare.write_params(tiny_params())
    fails_cleanly(run_in_process, bare, "register", "reports/evaluate/metrics.json", "evaluate stage first")


def test_register_without_a_run_reference_names_it(run_in_process: RunStage, prepared: PipelineWorkspace) -> None:
    metrics = prepared.root / "reports" / "evaluate" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"macro_f1": 0.5}\n')
    fails_cleanly(run_in_process, prepared, "register", "reports/train/mlflow_run.json")
    assert not prepared.db_path.exists()


def test_evaluate_with_a_run_missing_from_mlflow_writes_no_report(
        run_in_process: RunStage, prepared: PipelineWorkspace) -> None:
    # the situation after `rm mlflow.db` with the pipeline's outputs still in place
    save_random_bundle(prepared.root / "models" / "model", prepared.root / "data" / "prepared" / "classes.json")
    ref = prepared.root / "reports" / "train" / "mlflow_run.json"
    ref.parent.mkdir(parents=True)
    ref.write_text(f'{{"run_id": "{"0" * 32}", "tracking_uri": "{prepared.tracking_uri}"}}\n')
    files_before = prepared.files()
    outcome = run_in_process(prepared, "evaluate")
    assert_one_line_error(outcome, "0" * 32, prepared.tracking_uri)
    # MLflow creates an empty database on first contact; nothing else may appear
    assert prepared.files() - files_before <= {"mlflow.db"}
    assert not (prepared.root / "reports" / "evaluate").exists()
    assert registry_snapshot(prepared).versions == ()


def test_train_with_unusable_pretrained_weights_leaves_no_run_reference(
        run_in_process: RunStage, prepared: PipelineWorkspace, tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not a state dict")
    # the file exists, so params pass; the failure comes after the MLflow run has started
    prepared.write_params(tiny_params(**{"model.backbone": "googlenet", "model.pretrained_weights": str(weights)}))
    assert_one_line_error(run_in_process(prepared, "train"), str(weights))
    assert not (prepared.root / "models").exists()
    assert not (prepared.root / "reports" / "train").exists()


# ---- the process boundary -------------------------------------------------------------------


@pytest.mark.parametrize("stage, overrides, mentions", [
    ("train", {"train.lr": -1}, ("params.yaml", "train.lr")),
    ("evaluate", {}, ("reports/train/mlflow_run.json",)),
])
def test_a_stage_process_exits_1_with_only_the_error_on_stderr(
        bare: PipelineWorkspace, stage: str, overrides: dict[str, Any], mentions: tuple[str, ...]) -> None:
    bare.write_params(tiny_params(**overrides))
    files_before = bare.files()
    outcome = bare.stage(stage)
    assert outcome.exit_code == 1
    error = assert_one_line_error(outcome, *mentions)
    assert outcome.stderr.strip() == error  # no warnings, log lines or progress bars around it
    assert outcome.stdout == ""
    assert bare.files() == files_before


# ---- a failing validation stops `dvc repro` -------------------------------------------------


def make_leaky_imagefolder(root: Path) -> Path:
    """ImageFolder with train/val/test, balanced, textured images; one test image is a training image."""
    rng = np.random.default_rng(7)
    for split, per_class in (("train", 6), ("val", 3), ("test", 3)):
        for label in ("benign", "malignant"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{i}.png")
    shutil.copyfile(root / "train" / "malignant" / "train_0.png", root / "test" / "malignant" / "test_0.png")
    return root


def test_a_leaky_dataset_stops_dvc_repro_before_training(tmp_path: Path) -> None:
    root = make_leaky_imagefolder(tmp_path / "raw")
    workspace = make_workspace(tmp_path / "ws", tiny_params(**{"data.source": "imagefolder",
                                                                "data.root": str(root)}))
    result = workspace.dvc("repro", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: validation failed")]
    assert len(errors) == 1, result.stderr
    assert "leakage" in errors[0] and "test_0" in errors[0]
    assert "Running stage 'train'" not in result.stdout
    # the report explains the failure; nothing downstream exists
    assert (workspace.root / "reports" / "validation" / "validation.md").is_file()
    for path in ("models", "reports/train", "reports/evaluate", "reports/register", "mlflow.db", "mlartifacts"):
        assert not (workspace.root / path).exists(), f"{path} exists after a failed validation"
    assert workspace.stale_stages() >= {"validate", "train"}


# ---- helpers --------------------------------------------------------------------------------


def save_random_bundle(out_dir: Path, classes_json: Path) -> Path:
    """A random-weight model for the tiny prepared set (evaluate only needs it to load and run)."""
    import json

    import torch

    from medattn.models.bundle import save_bundle
    from medattn.models.factory import ModelSpec, create_model

    class_names = tuple(json.loads(classes_json.read_text())["class_names"])
    image_size = tiny_params()["data"]["image_size"]
    torch.manual_seed(0)
    spec = ModelSpec(backbone="small_cnn", attention="global_pixel", num_classes=len(class_names),
                     image_size=image_size, class_names=class_names, n_pixel_channels=6, K=4)
    model = create_model(spec)
    model.set_pixel_representation(torch.rand(1, 6, image_size, image_size))
    model.freeze()
    return save_bundle(model, spec, out_dir)
