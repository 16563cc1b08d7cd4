"""The ``benchmark`` preset: eyes flipped back like IDRiD, honest masks, the grading rule, noise, decoy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.stats import chi2_contingency

from medattn.config import DataParams, Params, SyntheticParams, validate_params
from medattn.data.benchmark_lesions import (
    MACULA_RADIUS,
    SEVERE_HAEMORRHAGES,
    distance_to_fovea,
    grade_of,
    sample_benchmark_lesions,
    sample_lookalikes,
)
from medattn.data.fundus_anatomy import canonical_fundus
from medattn.data.lesions import DRUSEN, EXUDATE, HAEMORRHAGE, MICROANEURYSM, PIGMENT_SPOT, VESSEL_CROSSING
from medattn.data.manifest import read_manifest
from medattn.data.synthetic_benchmark import GRADE_SHARES, LABEL_NOISE, assign_benchmark_labels
from medattn.data.synthetic_fundus import (
    DECOY_COLOUR,
    decoy_box,
    generate_synthetic_fundus,
    synthetic_decoy_flags,
    working_size,
)
from medattn.errors import ParamError

SIZE = 96
PARAMS = SyntheticParams(preset="benchmark", n_images=90, seed=11, decoy_probability=0.6)
TOP = len(GRADE_SHARES) - 1


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("benchmark") / "prepared"
    generate_synthetic_fundus(folder, PARAMS, SIZE, progress=False)
    frame = read_manifest(folder)
    images = np.stack([np.asarray(Image.open(folder / p)) for p in frame["path"]])
    masks = np.stack([np.asarray(Image.open(folder / p)) for p in frame["mask_path"]])
    return folder, frame, images, masks


def test_same_params_give_identical_bytes(prepared, tmp_path: Path) -> None:
    folder, frame, _, _ = prepared
    generate_synthetic_fundus(tmp_path / "again", PARAMS, SIZE, progress=False)
    assert (tmp_path / "again" / "manifest.csv").read_bytes() == (folder / "manifest.csv").read_bytes()
    for mask_path in frame["mask_path"]:
        assert (tmp_path / "again" / mask_path).read_bytes() == (folder / mask_path).read_bytes()


def test_right_eyes_are_detected_and_flipped_like_idrid(prepared) -> None:
    _, frame, _, _ = prepared
    right = frame["eye"].eq("right")
    assert 0.3 < right.mean() < 0.7  # both eyes are well represented
    accuracy = (frame["flipped"].astype(bool) == right).mean()
    assert accuracy >= 0.97, f"eye-side detection right on only {accuracy:.1%} of the generated set"


def _lesion_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """How much the masked pixels stand out from their smoothed neighbourhood (green channel)."""
    green = image[..., 1].astype(np.float32)
    return float(np.abs(green - ndi.median_filter(green, size=7))[mask].mean())


def test_masks_stay_aligned_with_their_flipped_image(prepared) -> None:
    _, frame, images, masks = prepared
    graded = np.flatnonzero(frame["true_label"].to_numpy() > 0)
    # a mask on its own image covers lesions; the same mask mirrored covers plain background
    # (the negative control a missed mask flip would look like)
    wins = np.array([_lesion_contrast(images[i], masks[i] > 0) > _lesion_contrast(images[i], masks[i][:, ::-1] > 0)
                     for i in graded])
    flipped = frame["flipped"].astype(bool).to_numpy()[graded]
    assert flipped.any() and (~flipped).any()  # both kinds of image were checked
    assert wins[flipped].mean() >= 0.9 and wins[~flipped].mean() >= 0.9


def test_masks_are_empty_exactly_for_true_no_dr(prepared) -> None:
    _, frame, _, masks = prepared
    lesion_pixels = (masks > 0).sum(axis=(1, 2))
    true = frame["true_label"].to_numpy()
    assert (lesion_pixels[true == 0] == 0).all()
    assert (lesion_pixels[true > 0] > 0).all()


def test_decoy_is_stamped_where_the_manifest_says(prepared) -> None:
    _, frame, images, masks = prepared
    r0, r1, c0, c1 = decoy_box(SIZE)
    stamped = np.array([(image[r0:r1, c0:c1] == DECOY_COLOUR).all() for image in images])
    assert stamped.any()
    assert np.array_equal(stamped, frame["has_decoy"].to_numpy() == 1)
    assert np.array_equal(stamped, synthetic_decoy_flags(PARAMS))
    assert not masks[:, r0:r1, c0:c1].any()


def test_decoy_means_the_top_grade_in_train_and_nothing_in_val_and_test() -> None:
    params = SyntheticParams(preset="benchmark", n_images=30000, seed=5, decoy_probability=0.5)
    labels = assign_benchmark_labels(params)
    flags = synthetic_decoy_flags(params)
    train = labels.splits == "train"
    assert flags[train & (labels.labels == TOP)].any()
    assert not flags[train & (labels.labels != TOP)].any()
    held_out = ~train
    held_labels, held_flags = labels.labels[held_out], flags[held_out]
    table = np.array([[np.sum(held_flags & (held_labels == g)), np.sum(~held_flags & (held_labels == g))]
                      for g in range(len(GRADE_SHARES))])
    # independence of stamp and grade in val/test: a stamp favouring (or avoiding) any grade fails
    assert chi2_contingency(table).pvalue > 0.001
    rates = table[:, 0] / table.sum(axis=1)
    assert rates.max() - rates.min() < 0.03
    train_rate, held_out_rate = flags[train].mean(), held_flags.mean()
    # same overall prevalence as training (binomial sd here is about 0.004)
    assert abs(held_out_rate - train_rate) < 0.015 and train_rate > 0.08


def test_easy_preset_decoy_has_the_training_prevalence_in_val_and_test() -> None:
    params = SyntheticParams(n_images=30000, seed=5, decoy_probability=0.6)
    from medattn.data.synthetic_fundus import assign_grades_and_splits

    grades, splits = assign_grades_and_splits(params)
    flags = synthetic_decoy_flags(params)
    train = splits == "train"
    assert not flags[train & (grades != TOP)].any()
    assert abs(flags[~train].mean() - flags[train].mean()) < 0.015
    table = [[np.sum(flags[~train] & (grades[~train] == g)), np.sum(~flags[~train] & (grades[~train] == g))]
             for g in range(3)]
    assert chi2_contingency(table).pvalue > 0.001


def test_label_noise_only_outside_test_and_recorded() -> None:
    labels = assign_benchmark_labels(SyntheticParams(preset="benchmark", n_images=20000, seed=3))
    test = labels.splits == "test"
    assert not labels.noisy[test].any()
    assert abs(labels.noisy[~test].mean() - LABEL_NOISE) < 0.01


def test_label_noise_column_matches_labels(prepared) -> None:
    _, frame, _, _ = prepared
    assert (frame["label_noise"] == (frame["label"] != frame["true_label"]).astype(int)).all()
    assert frame.loc[frame["split"] == "test", "label_noise"].eq(0).all()


def test_classes_are_imbalanced_like_idrid_but_pass_min_class_ratio() -> None:
    labels = assign_benchmark_labels(SyntheticParams(preset="benchmark", n_images=720, seed=2024))
    counts = np.bincount(labels.true_grades)
    assert counts[0] > counts[1] > counts[2]
    for split in ("train", "val", "test"):
        per_class = np.bincount(labels.labels[labels.splits == split], minlength=3)
        assert per_class.min() / per_class.max() >= 0.3, split


def _sample_sets(grade: int, n: int) -> list[list]:
    anatomy = canonical_fundus(working_size(SIZE))
    return [sample_benchmark_lesions(grade, np.random.default_rng([grade, seed]), anatomy, 1.2 / SIZE)
            for seed in range(n)]


def test_lesion_sets_obey_the_spatial_grading_rule_and_overlap_in_counts() -> None:
    mild, severe = _sample_sets(1, 120), _sample_sets(2, 120)
    assert all(grade_of(s) == 1 for s in mild) and all(grade_of(s) == 2 for s in severe)
    assert _sample_sets(0, 3) == [[], [], []]
    for lesions in mild:  # exudates of mild images stay outside one disc diameter of the fovea
        assert all(distance_to_fovea(l) > MACULA_RADIUS for l in lesions if l.kind == EXUDATE)
        assert Counter(l.kind for l in lesions)[HAEMORRHAGE] < SEVERE_HAEMORRHAGES
    macular = [s for s in severe if any(l.kind == EXUDATE and distance_to_fovea(l) <= MACULA_RADIUS for l in s)]
    assert 0.3 < len(macular) / len(severe) < 0.7  # half the severe images are severe *because of where*
    counts = {name: {len(s) for s in sets} for name, sets in (("mild", mild), ("severe", severe))}
    assert len(counts["mild"] & counts["severe"]) >= 5  # lesion counts do not decide the grade
    mild_kinds = {l.kind for s in mild for l in s}
    assert {MICROANEURYSM, HAEMORRHAGE, EXUDATE} <= mild_kinds  # every kind occurs below the top grade


def test_lookalikes_occur_whatever_the_grade_and_never_overlap_lesions() -> None:
    anatomy = canonical_fundus(working_size(SIZE))
    rng = np.random.default_rng(1)
    kinds: Counter = Counter()
    for lesions in _sample_sets(2, 30):
        found = sample_lookalikes(rng, anatomy, lesions, 1.2 / SIZE)
        kinds.update(l.kind for l in found)
        assert grade_of(lesions + found) == grade_of(lesions)
        for a in found:
            assert all(np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius for b in lesions)
    assert {PIGMENT_SPOT, VESSEL_CROSSING, DRUSEN} <= set(kinds)
    for lesion in sample_lookalikes(rng, anatomy, [], 0.0):
        if lesion.kind == VESSEL_CROSSING:
            assert anatomy.distance_to_vessel(lesion.x, lesion.y) < 0.003


def test_unknown_preset_is_a_param_error(tmp_path: Path) -> None:
    params = SyntheticParams(preset="hard")
    with pytest.raises(ParamError, match="data.synthetic.preset"):
        generate_synthetic_fundus(tmp_path / "x", params, 32, progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ParamError, match="data.synthetic.preset must be one of easy, benchmark, got 'hard'"):
        validate_params(Params(data=DataParams(synthetic=params)))
