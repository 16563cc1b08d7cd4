"""The whole pipeline (`dvc repro`: prepare -> validate -> train -> evaluate -> register) on every
real source layout, from a tiny fixture in its published layout (tests/fixtures/real_layouts).

No real source ships lesion masks, so each run must get past evaluate with attention
faithfulness reported as absent (a run on a real dataset once died there). The fixtures cover
what real folders bring: grey-level (mode L) and colour images, grey TIFFs, non-square images
of a different size each, and given or carved train/val/test splits. Every run is 32 px and
one epoch; nothing here judges what the model learnt, only that every stage works.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image
from pipeline_workspace import (
    MODEL_NAME,
    STAGES,
    make_workspace,
    ran_stages,
    tiny_params,
)

from tests.fixtures.real_layouts import (
    make_idrid,
    make_imagefolder,
    make_jaffe,
    make_malaria,
)

pytestmark = pytest.mark.e2e

# a quarter to val and a quarter to test: every class of a tiny fixture reaches every split
SPLIT_FRACTIONS = {"data.val_fraction": 0.25, "data.test_fraction": 0.25}


@dataclass(frozen=True)
class SourceCase:
    source: str
    build: Callable[[Path], Path]  # writes the raw dataset under the given folder, returns data.root
    n_images: int
    n_classes: int
    params: dict[str, Any]


def _idrid(root: Path) -> Path:
    # every retinopathy grade in both official sets; the val split is carved from training
    train = {f"IDRiD_{i:03d}": (i % 5, i % 3) for i in range(1, 21)}
    test = {f"IDRiD_{i:03d}": (i % 5, i % 3) for i in range(1, 11)}
    return make_idrid(root, train, test, right_eyes={"IDRiD_002", "IDRiD_007"}, textured_images=True)


def _jaffe(root: Path) -> Path:
    # four pictures per emotion, each rated highest on it (the label is the top rating)
    posers, ratings = ("KA", "KL", "KM", "KR"), {}
    for e, code in enumerate(("HA", "SA", "SU", "AN", "DI", "FE")):
        for p, poser in enumerate(posers):
            ratings[f"{poser}-{code}{p + 1}"] = [4.5 if k == e else 1.5 + 0.1 * k for k in range(6)]
    return make_jaffe(root, ratings, textured_images=True)


CASES: dict[str, SourceCase] = {
    "imagefolder-unsplit-grey-odd-sizes": SourceCase(
        "imagefolder",
        lambda root: make_imagefolder(root, {"benign": 8, "malignant": 8}, mode="L", odd_sizes=True,
                                      textured_images=True),
        n_images=16, n_classes=2, params=SPLIT_FRACTIONS),
    "imagefolder-given-splits-colour-odd-sizes": SourceCase(
        "imagefolder",
        lambda root: make_imagefolder(root, {"benign": 4, "malignant": 4}, splits=("train", "val", "test"),
                                      mode="RGB", odd_sizes=True, textured_images=True),
        n_images=24, n_classes=2, params={}),
    "idrid": SourceCase("idrid", _idrid, n_images=30, n_classes=5, params=SPLIT_FRACTIONS),
    "jaffe-grey-tiff": SourceCase("jaffe", _jaffe, n_images=24, n_classes=6, params=SPLIT_FRACTIONS),
    "malaria": SourceCase("malaria", lambda root: make_malaria(root, 8, 8, textured_images=True),
                          n_images=16, n_classes=2, params=SPLIT_FRACTIONS),
}


@dataclass(frozen=True)
class SourceRun:
    case: SourceCase
    root: Path
    ran: set[str]
    metrics_shown: dict[str, Any]


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def source_run(request, tmp_path_factory) -> SourceRun:
    case = CASES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    data_root = case.build(base / "raw")
    params = tiny_params(**{"data.source": case.source, "data.root": str(data_root), "train.epochs": 1,
                            "train.cutoff_epoch": 1, **case.params})
    workspace = make_workspace(base / "ws", params)
    ran = ran_stages(workspace.dvc("repro").stdout)
    shown = json.loads(workspace.dvc("metrics", "show", "--json").stdout)
    return SourceRun(case, workspace.root, ran, shown[""]["data"])


def test_every_stage_runs_to_register(source_run: SourceRun) -> None:
    assert source_run.ran == set(STAGES)
    decision = json.loads((source_run.root / "reports/register/decision.json").read_text())
    assert decision["model_name"] == MODEL_NAME
    assert decision["version"] == "1" and decision["promoted"] is True


def test_prepare_keeps_every_image_as_a_square_rgb_image(source_run: SourceRun) -> None:
    # grey-level and odd-sized sources become the one data contract: RGB, image_size squared,
    # which is what validate.expected_channels = 3 checks
    prepared = source_run.root / "data/prepared"
    manifest = pd.read_csv(prepared / "manifest.csv")
    assert len(manifest) == source_run.case.n_images
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert len(json.loads((prepared / "classes.json").read_text())["class_names"]) == source_run.case.n_classes
    for relative in manifest["path"]:
        with Image.open(prepared / relative) as image:
            assert (image.mode, image.size) == ("RGB", (32, 32)), relative
    validation = json.loads((source_run.root / "reports/validation/validation.json").read_text())
    assert validation["success"] is True


def test_evaluate_reports_faithfulness_as_absent_and_both_baselines(source_run: SourceRun) -> None:
    metrics = json.loads((source_run.root / "reports/evaluate/metrics.json").read_text())
    manifest = pd.read_csv(source_run.root / "data/prepared/manifest.csv")
    assert metrics["n_images"] == int((manifest["split"] == "test").sum())
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    # no masks anywhere: nothing is scored, and no made-up number stands in for the scores
    assert metrics["attention"] == {"available": False, "n_images_with_mask": 0, "topk_percent": 5.0}
    baseline = metrics["baseline"]
    assert {"macro_f1", "pixel_logreg_macro_f1", "pixel_logreg_accuracy"} <= set(baseline)
    assert 0.0 <= baseline["pixel_logreg_macro_f1"] <= 1.0
    shown = source_run.metrics_shown["reports/evaluate/metrics.json"]
    assert "error" not in shown
    assert shown["data"]["attention"]["available"] is False
    assert shown["data"]["baseline"]["pixel_logreg_accuracy"] == pytest.approx(baseline["pixel_logreg_accuracy"])
