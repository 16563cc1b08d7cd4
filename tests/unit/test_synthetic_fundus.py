"""The embedded synthetic fundus set: deterministic, graded only by lesions, honest masks and decoy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.stats import f_oneway

from medattn.config import SyntheticParams
from medattn.data.fundus_anatomy import (
    FUNDUS_CENTRE,
    FUNDUS_RADIUS,
    OPTIC_DISC_CENTRE,
    OPTIC_DISC_RADIUS,
    canonical_fundus,
    distance_to_fundus_centre,
    distance_to_optic_disc,
)
from medattn.data.lesions import MICROANEURYSM, sample_lesions
from medattn.data.manifest import read_class_names, read_manifest
from medattn.data.synthetic_fundus import (
    CLASS_NAMES,
    DECOY_COLOUR,
    Appearance,
    decoy_box,
    generate_synthetic_fundus,
    render_fundus,
    working_size,
)
from medattn.errors import ParamError

SIZE = 48
PARAMS = SyntheticParams(n_images=60, seed=7, train_fraction=0.6, val_fraction=0.15, decoy_probability=0.0)


def _load(folder: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    frame = read_manifest(folder)
    images = np.stack([np.asarray(Image.open(folder / p)) for p in frame["path"]])
    masks = np.stack([np.asarray(Image.open(folder / p)) for p in frame["mask_path"]])
    return frame, images, masks


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("clean") / "prepared"
    generate_synthetic_fundus(folder, PARAMS, SIZE, progress=False)
    return (folder, *_load(folder))


@pytest.fixture(scope="module")
def with_decoy(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("decoy") / "prepared"
    params = SyntheticParams(n_images=60, seed=7, decoy_probability=0.5)
    generate_synthetic_fundus(folder, params, SIZE, progress=False)
    return _load(folder)


def test_same_params_give_identical_bytes(clean, tmp_path: Path) -> None:
    folder, frame, _, masks = clean
    again = tmp_path / "again"
    generate_synthetic_fundus(again, PARAMS, SIZE, progress=False)
    assert (again / "manifest.csv").read_bytes() == (folder / "manifest.csv").read_bytes()
    other_frame, _, other_masks = _load(again)
    assert np.array_equal(other_masks, masks)

    reseeded = tmp_path / "reseeded"
    generate_synthetic_fundus(reseeded, SyntheticParams(n_images=60, seed=8), SIZE, progress=False)
    assert not set(read_manifest(reseeded)["sha256"]) & set(frame["sha256"])


def test_files_follow_the_contract(clean) -> None:
    folder, frame, images, masks = clean
    assert read_class_names(folder) == list(CLASS_NAMES)
    assert images.shape == (60, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert masks.shape == (60, SIZE, SIZE)
    assert set(np.unique(masks).tolist()) <= {0, 255}
    assert (frame["label_name"] == frame["label"].map(dict(enumerate(CLASS_NAMES)))).all()
    assert frame["has_decoy"].eq(0).all()


def test_balanced_grades_and_stratified_split(clean) -> None:
    _, frame, _, _ = clean
    assert frame["label"].value_counts().sort_index().tolist() == [20, 20, 20]
    counts = frame.groupby(["label", "split"]).size().unstack()
    # 20 per grade: round(20 * 0.6) train, round(20 * 0.15) val, the rest test
    assert counts["train"].tolist() == [12, 12, 12]
    assert counts["val"].tolist() == [3, 3, 3]
    assert counts["test"].tolist() == [5, 5, 5]


def test_masks_are_empty_exactly_for_grade_zero(clean) -> None:
    _, frame, _, masks = clean
    lesion_pixels = (masks > 0).sum(axis=(1, 2))
    labels = frame["label"].to_numpy()
    assert (lesion_pixels[labels == 0] == 0).all()
    assert (lesion_pixels[labels > 0] > 0).all()
    # severe images carry haemorrhages and exudates: far more lesion area than mild ones
    assert lesion_pixels[labels == 2].min() > np.median(lesion_pixels[labels == 1])


def test_lesions_never_fall_on_the_black_border(clean) -> None:
    _, _, images, masks = clean
    assert (images.max(axis=3)[masks > 0] > 20).all()


def test_rendered_lesions_stay_off_the_optic_disc_and_inside_the_fundus() -> None:
    # without acquisition jitter the output frame is the canonical frame, so the landmarks are known
    still = Appearance(rotation_deg=0.0, zoom=1.0, shift=(0.0, 0.0), gain=1.0, channel_gain=(1.0, 1.0, 1.0),
                       gamma=1.0, light_angle=0.0, light_strength=0.0)
    anatomy = canonical_fundus(working_size(SIZE))
    rows, cols = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
    disc = np.hypot(cols - OPTIC_DISC_CENTRE[0], rows - OPTIC_DISC_CENTRE[1]) < OPTIC_DISC_RADIUS
    outside = np.hypot(cols - FUNDUS_CENTRE[0], rows - FUNDUS_CENTRE[1]) > FUNDUS_RADIUS - 0.05
    for seed in range(20):
        _, mask = render_fundus(2, still, np.random.default_rng(seed), anatomy, SIZE)
        lesion = np.asarray(mask) > 0
        assert lesion.any()
        assert not (lesion & disc).any() and not (lesion & outside).any()


def test_brightness_does_not_reveal_the_grade(clean) -> None:
    _, frame, images, _ = clean
    brightness = images.reshape(len(images), -1).mean(axis=1)
    by_grade = [brightness[frame["label"].to_numpy() == g] for g in range(3)]
    # acquisition variation (std ~13 grey levels) dwarfs the lesions' effect on the mean:
    # no significant difference between grades (one-way ANOVA), and no gross one either
    assert f_oneway(*by_grade).pvalue > 0.05
    class_means = [values.mean() for values in by_grade]
    assert max(class_means) - min(class_means) < 0.75 * brightness.std()


def test_anatomy_is_aligned_across_images(clean) -> None:
    _, frame, images, _ = clean
    for image in images[frame["label"].to_numpy() == 0]:  # no exudates to outshine the disc
        glow = ndi.gaussian_filter(image.mean(axis=2), sigma=2)
        row, col = np.unravel_index(glow.argmax(), glow.shape)
        assert abs(col / SIZE - OPTIC_DISC_CENTRE[0]) < 0.1 and abs(row / SIZE - OPTIC_DISC_CENTRE[1]) < 0.1


def test_sampled_lesions_respect_clinical_sites() -> None:
    anatomy = canonical_fundus(working_size(SIZE))
    rng = np.random.default_rng(0)
    lesions = [lesion for _ in range(30) for lesion in sample_lesions(2, rng, anatomy)]
    assert len({lesion.kind for lesion in lesions}) == 3
    for lesion in lesions:
        assert distance_to_fundus_centre(lesion.x, lesion.y) < 0.41
        assert distance_to_optic_disc(lesion.x, lesion.y) > OPTIC_DISC_RADIUS + 1.5 * lesion.radius
        if lesion.kind == MICROANEURYSM:
            assert anatomy.distance_to_vessel(lesion.x, lesion.y) > lesion.radius
    assert sample_lesions(0, rng, anatomy) == []
    assert {lesion.kind for lesion in sample_lesions(1, rng, anatomy)} == {MICROANEURYSM}


def test_microaneurysms_stay_visible_at_96_px(tmp_path: Path) -> None:
    generate_synthetic_fundus(tmp_path / "big", SyntheticParams(n_images=12, seed=3), 96, progress=False)
    frame, _, masks = _load(tmp_path / "big")
    mild = masks[frame["label"].to_numpy() == 1] > 0
    # at least 3 microaneurysms, each covering several pixels
    assert (mild.sum(axis=(1, 2)) >= 3 * 5).all()


def _has_stamp(image: np.ndarray) -> bool:
    r0, r1, c0, c1 = decoy_box(image.shape[0])
    return bool((image[r0:r1, c0:c1] == DECOY_COLOUR).all())


def test_decoy_tracks_the_top_grade_in_train_only(with_decoy) -> None:
    frame, images, masks = with_decoy
    stamped = np.array([_has_stamp(image) for image in images])
    assert np.array_equal(stamped, frame["has_decoy"].to_numpy() == 1)
    train = frame["split"].eq("train").to_numpy()
    top = frame["label"].eq(2).to_numpy()
    assert stamped[train & top].any() and not stamped[train & top].all()
    assert not stamped[train & ~top].any()  # in train the stamp means "severe"
    held_out = ~train
    assert stamped[held_out & ~top].any()  # in val/test it does not
    r0, r1, c0, c1 = decoy_box(SIZE)
    assert not masks[:, r0:r1, c0:c1].any()  # the stamp is no lesion


def test_clean_images_have_no_stamp(clean) -> None:
    _, _, images, _ = clean
    assert not any(_has_stamp(image) for image in images)


@pytest.mark.parametrize("image_size", [8, 2048])
def test_bad_image_size_is_a_param_error(tmp_path: Path, image_size: int) -> None:
    with pytest.raises(ParamError, match="image_size"):
        generate_synthetic_fundus(tmp_path / "x", PARAMS, image_size, progress=False)
    assert not (tmp_path / "x").exists()


def test_decoy_size_sets_the_stamp_and_stays_outside_the_fundus(tmp_path: Path) -> None:
    big = SyntheticParams(n_images=30, seed=7, decoy_probability=1.0, decoy_size=0.12)
    generate_synthetic_fundus(tmp_path / "big", big, SIZE, progress=False)
    frame, images, _ = _load(tmp_path / "big")
    r0, r1, c0, c1 = decoy_box(SIZE, 0.12)
    assert (r1 - r0) > (decoy_box(SIZE)[1] - decoy_box(SIZE)[0])  # larger than the default stamp
    stamped = images[frame["has_decoy"].to_numpy() == 1]
    assert len(stamped) and (stamped[:, r0:r1, c0:c1] == DECOY_COLOUR).all()
    # its inner corner lies outside the fundus circle: the stamp covers no retina
    inner = np.array([(r0 + 0.5) / SIZE, (c0 + 0.5) / SIZE])
    assert float(np.hypot(*(inner - np.asarray(FUNDUS_CENTRE)))) > FUNDUS_RADIUS


def test_a_decoy_larger_than_the_black_corner_is_refused() -> None:
    from medattn.config import DataParams, Params, validate_params

    with pytest.raises(ParamError, match="decoy_size"):
        validate_params(Params(data=DataParams(synthetic=SyntheticParams(decoy_size=0.2))))
