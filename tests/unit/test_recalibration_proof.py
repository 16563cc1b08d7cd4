"""The recalibration proof's own pieces (benchmarks/recalibration_proof.py), on tiny inputs.

The proof's figures are only as good as these: the simulated experts must mark the decoy
irrelevant and the lesions relevant *as the feedback store rasterises them*, must stay within
10% of the training images, the decoy put back on the decoy-free test images must be the
dataset's own stamp, and the attention shares must be what the maps say.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.recalibration_proof import (
    ProofConfig,
    choose_roi_images,
    config_from,
    decoy_region,
    load_test_images,
    measure_model,
    parse_args,
    proof_params,
    simulated_rois,
    stamp_decoy,
    summarise,
)
from medattn.config import load_params
from medattn.data.dataset import load_split
from medattn.data.manifest import read_manifest
from medattn.data.prepare import prepare_dataset
from medattn.data.synthetic_fundus import decoy_box
from medattn.feedback.schema import IRRELEVANT, RELEVANT, UNTOUCHED, feedback_map, parse_submission

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n_train", [9, 10, 57, 240, 431])
def test_roi_images_are_at_most_the_share_of_the_training_images(n_train: int) -> None:
    ids = [f"syn_{i:05d}" for i in range(n_train)]
    if n_train < 10:
        with pytest.raises(ValueError, match="no image at all"):
            choose_roi_images(ids, 0.10, seed=0)
        return
    chosen = choose_roi_images(ids, 0.10, seed=3)
    assert 1 <= len(chosen) <= 0.10 * n_train
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(ids)
    assert chosen == choose_roi_images(list(reversed(ids)), 0.10, seed=3)  # a function of the ids and seed
    assert chosen != choose_roi_images(ids, 0.10, seed=4) or n_train < 20


def test_share_over_ten_percent_is_refused() -> None:
    args = parse_args(["--roi-share", "0.2"])
    with pytest.raises(SystemExit, match="10%"):
        config_from(args)
    assert config_from(parse_args(["--quick"])).image_size == 48


def test_simulated_rois_mark_the_decoy_irrelevant_and_lesions_relevant_as_stored() -> None:
    size = 48
    lesion = np.zeros((size, size), dtype=bool)
    lesion[10:14, 20:23] = True
    lesion[30, 8] = True
    submission = parse_submission({"model_name": "m", "model_version": "1", "expert_id": "e",
                                   "rois": simulated_rois(lesion, size)})
    painted = feedback_map(submission.rois, size, size)  # what `medattn feedback export` writes
    r0, r1, c0, c1 = decoy_box(size)
    decoy = np.zeros_like(lesion)
    decoy[r0:r1, c0:c1] = True
    assert (painted[decoy] == IRRELEVANT).all()
    assert (painted[lesion] == RELEVANT).all()
    assert (painted[~decoy & ~lesion] == UNTOUCHED).all()
    # an image without lesions still gets the decoy marked, and nothing relevant
    empty = feedback_map(parse_submission({"model_name": "m", "model_version": "1", "expert_id": "e",
                                           "rois": simulated_rois(np.zeros_like(lesion), size)}).rois, size, size)
    assert (empty[decoy] == IRRELEVANT).all() and not (empty == RELEVANT).any()


class _FixedMap(nn.Module):
    """Predicts class 2 iff the decoy is there; its map puts ``inside`` on the decoy square."""

    def __init__(self, size: int, inside: float) -> None:
        super().__init__()
        self.map = torch.full((1, 1, size, size), 1.0)
        self.map[decoy_region(size)] = inside
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r0, r1, c0, c1 = decoy_box(x.shape[-1])
        cyan = (x[:, 0, r0:r1, c0:c1].mean((1, 2)) < 0) & (x[:, 2, r0:r1, c0:c1].mean((1, 2)) > 1)
        logits = torch.zeros(x.shape[0], 3)
        logits[cyan, 2] = 1.0
        logits[~cyan, 0] = 1.0
        return logits, self.map.expand(x.shape[0], -1, -1, -1)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """The benchmark preset, tiny, prepared with and without the decoy (the proof's two sets)."""
    root = tmp_path_factory.mktemp("proof-sets")
    base = load_params(REPO_ROOT / "params.yaml")
    cfg = replace(ProofConfig(), n_images=60, image_size=32)
    decoy = proof_params(base, cfg, 0, "input_attention", True, "sqlite:///unused.db", "m")
    clean = proof_params(base, cfg, 0, "input_attention", False, "sqlite:///unused.db", "m")
    prepare_dataset(decoy, root / "decoy", progress=False)
    prepare_dataset(clean, root / "clean", progress=False)
    return root / "decoy", root / "clean"


def test_decoy_free_test_split_is_the_decoy_sets_test_split_without_the_stamp(two_sets) -> None:
    decoy_dir, clean_dir = two_sets
    frame = read_manifest(decoy_dir)
    assert frame.loc[frame["split"] == "train", "has_decoy"].sum() > 0  # the shortcut is there to learn
    assert read_manifest(clean_dir)["has_decoy"].sum() == 0
    test = load_test_images(clean_dir, decoy_dir)
    stamped_in_dataset = load_split(decoy_dir, "test", with_masks=False)
    flags = frame.set_index("id").loc[stamped_in_dataset.ids, "has_decoy"].to_numpy().astype(bool)
    # putting the decoy back gives exactly the pixels the dataset stamped
    assert torch.equal(test.stamped[flags], stamped_in_dataset.images[flags])
    assert not torch.equal(test.clean[flags], stamped_in_dataset.images[flags])
    assert torch.equal(stamp_decoy(test.clean), test.stamped)


def test_measure_model_reads_the_decoy_share_and_the_shortcut(two_sets) -> None:
    decoy_dir, clean_dir = two_sets
    test = load_test_images(clean_dir, decoy_dir)
    spec = argparse.Namespace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    size = test.clean.shape[-1]
    area = float(decoy_region(size).float().mean())
    looking = measure_model(_FixedMap(size, inside=50.0), spec, test)
    ignoring = measure_model(_FixedMap(size, inside=0.0), spec, test)
    expected = 50.0 * area / (50.0 * area + (1 - area))
    assert looking["decoy_mass"] == pytest.approx(expected, rel=1e-5)
    assert ignoring["decoy_mass"] == 0.0
    # on decoy-free images this model says no_DR for all: accuracy = the no_DR share of the test split
    assert looking["accuracy"] == pytest.approx(float((test.labels == 0).float().mean()))
    assert 0.0 < looking["lesion_mass"] < 1.0


def test_summary_checks_each_goal() -> None:
    def case(seed, before, after, ceiling, decoy_before, decoy_after):
        row = lambda acc, decoy: {"accuracy": acc, "macro_f1": acc, "decoy_mass": decoy, "lesion_mass": 0.1}  # noqa: E731
        return {"seed": seed, "model": "input_attention", "before": row(before, decoy_before),
                "after": row(after, decoy_after), "ceiling": row(ceiling, 0.004), "roi_share": 0.1}

    met = summarise([case(0, 0.50, 0.80, 0.82, 0.10, 0.01), case(1, 0.52, 0.78, 0.80, 0.08, 0.01)])["input_attention"]
    assert met["goal"] == {"within_3_points_of_ceiling": True, "15_points_above_shortcut": True,
                           "decoy_mass_down_5x": True}
    assert met["before_accuracy"][0] == pytest.approx(51.0) and met["before_accuracy"][1] > 0
    missed = summarise([case(0, 0.50, 0.60, 0.82, 0.10, 0.05)])["input_attention"]["goal"]
    assert missed == {"within_3_points_of_ceiling": False, "15_points_above_shortcut": False,
                      "decoy_mass_down_5x": False}
