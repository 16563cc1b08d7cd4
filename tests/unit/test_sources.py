"""Real-data loaders on tiny fixtures in the published layouts, and the shared pre-processing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import retina

from medattn.config import DataParams
from medattn.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    area_resize,
    crop_columns,
    flip_horizontal,
    locate_optic_disc,
    normalize_tensor,
    optic_disc_side,
    to_model_input,
    to_rgb,
)
from medattn.data.sources import load_source, stratified_split
from medattn.data.sources.idrid import crop_bounds, preprocess_fundus
from medattn.errors import DataError, ParamError
from tests.fixtures.real_layouts import (
    IDRID_FIXTURE_SIZE,
    corrupt_image,
    draw_fundus,
    make_idrid,
    make_imagefolder,
    make_jaffe,
    make_malaria,
    write_idrid_csv,
)


def params(source: str, root: Path, **overrides) -> DataParams:
    return DataParams(source=source, root=str(root), image_size=overrides.pop("image_size", 24), **overrides)


def records(source: str, root: Path, **overrides) -> list[dict]:
    return list(load_source(params(source, root, **overrides)).records(progress=False))


# --- pre-processing --------------------------------------------------------------------------


def test_area_resize_averages_the_pixels_each_output_pixel_covers():
    pixels = np.array([[0, 100, 10, 10], [200, 100, 30, 30]], dtype=np.uint8)
    out = np.asarray(area_resize(Image.fromarray(pixels, mode="L"), (2, 1)))
    assert out.tolist() == [[100, 20]]


def test_area_resize_enlarges_without_error_and_keeps_a_square_int_size():
    assert area_resize(Image.new("RGB", (5, 7)), 16).size == (16, 16)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (4, 4), 77),
        Image.new("RGBA", (4, 4), (77, 77, 77, 255)),
    ],
    ids=["grey", "rgba"],
)
def test_to_rgb_gives_three_8_bit_channels(image):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, 0].tolist() == [77, 77, 77]


def test_to_rgb_rescales_16_bit_images_so_their_maximum_is_white():
    twelve_bit = Image.fromarray(np.array([[0, 1000, 4000]], dtype=np.uint16))  # e.g. a 12-bit X-ray
    assert np.asarray(to_rgb(twelve_bit))[0, :, 0].tolist() == [0, 64, 255]


def test_to_rgb_composites_transparency_onto_black():
    assert np.asarray(to_rgb(Image.new("RGBA", (2, 2), (255, 255, 255, 0))))[0, 0].tolist() == [0, 0, 0]


def test_crop_columns_keeps_both_bounds_and_rejects_outside_ones():
    image = Image.fromarray(np.arange(10, dtype=np.uint8)[None, :].repeat(3, axis=0), mode="L")
    assert np.asarray(crop_columns(image, 2, 5))[0].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        crop_columns(image, 3, 10)


def test_optic_disc_found_on_the_real_retina_photograph_and_its_mirror_image():
    photo = Image.fromarray(retina())  # CC0 fundus photograph shipped with scikit-image; disc on the left
    x, y = locate_optic_disc(photo)
    assert 0.08 < x < 0.25 and 0.35 < y < 0.6
    assert optic_disc_side(photo) == "left"
    assert optic_disc_side(flip_horizontal(photo)) == "right"


@pytest.mark.parametrize("side", ["left", "right"])
def test_optic_disc_side_ignores_small_brighter_spots_on_the_other_side(side):
    assert optic_disc_side(draw_fundus(disc_side=side)) == side


def test_normalize_tensor_scales_uint8_and_standardises_per_channel():
    pixels = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    out = normalize_tensor(pixels)
    expected = [(0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (1 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected))
    batch = normalize_tensor(pixels.unsqueeze(0).float() / 255)
    assert torch.allclose(batch[0], out)


def test_to_model_input_resizes_converts_and_normalises():
    tensor = to_model_input(Image.new("L", (40, 30), 255), 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(tensor, torch.ones(3, 16, 16))


# --- splits ----------------------------------------------------------------------------------


def test_stratified_split_is_per_class_reproducible_and_keeps_a_training_item():
    labels = [0] * 20 + [1] * 10 + [2] * 1
    splits = stratified_split(labels, 0.2, 0.3, seed=5)
    assert splits == stratified_split(labels, 0.2, 0.3, seed=5)
    per_class = {c: Counter(s for s, label in zip(splits, labels) if label == c) for c in (0, 1, 2)}
    assert per_class[0] == Counter(train=10, val=4, test=6)
    assert per_class[1] == Counter(train=5, val=2, test=3)
    assert per_class[2] == Counter(train=1)


# --- IDRiD -----------------------------------------------------------------------------------

TRAIN_GRADES = {f"IDRiD_{i:03d}": (i % 5, i % 3) for i in range(1, 21)}
TEST_GRADES = {f"IDRiD_{i:03d}": ((i + 1) % 5, i % 3) for i in range(1, 6)}
RIGHT_EYES = {"IDRiD_002", "IDRiD_005", "IDRiD_013"}


@pytest.fixture
def idrid_root(tmp_path: Path) -> Path:
    make_idrid(tmp_path / "idrid", TRAIN_GRADES, TEST_GRADES, right_eyes=RIGHT_EYES)
    return tmp_path / "idrid"


def test_idrid_crop_bounds_follow_seed_001_and_scale_with_the_width():
    assert crop_bounds(4288) == (260, 3685)
    assert crop_bounds(2144) == (130, 1843)
    assert crop_bounds(IDRID_FIXTURE_SIZE[0]) == (8, 115)


def blue_excess(image: Image.Image) -> int:
    """Largest blue-minus-red of any pixel: > 0 only where the blue margin paint shows through."""
    pixels = np.asarray(image, dtype=int)
    return int((pixels[..., 2] - pixels[..., 0]).max())


def test_idrid_crop_removes_exactly_the_background_columns():
    first, last = crop_bounds(IDRID_FIXTURE_SIZE[0])
    photo = draw_fundus(margin_colour=(0, 0, 255), crop_bounds=(first, last))
    assert blue_excess(crop_columns(photo, first - 1, last)) == 255  # the margin is really painted
    prepared, _ = preprocess_fundus(photo, image_size=64)
    assert blue_excess(prepared) <= 0
    # one more margin column on each side would leak into the area-averaged result
    wider = draw_fundus(margin_colour=(0, 0, 255), crop_bounds=(first + 1, last - 1))
    assert blue_excess(preprocess_fundus(wider, image_size=64)[0]) > 0


def test_idrid_labels_splits_and_ids(idrid_root: Path):
    rows = records("idrid", idrid_root)
    assert [r["id"] for r in rows[:2]] == ["train-IDRiD_001", "train-IDRiD_002"]
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 25
    for name, (grade, _) in TRAIN_GRADES.items():
        assert by_id[f"train-{name}"]["label"] == grade
        assert by_id[f"train-{name}"]["split"] in ("train", "val")
    for name, (grade, _) in TEST_GRADES.items():
        assert by_id[f"test-{name}"]["label"] == grade and by_id[f"test-{name}"]["split"] == "test"
    val = [r for r in rows if r["split"] == "val"]
    assert sorted(r["label"] for r in val) == [0, 1, 2, 3, 4]  # 4 per grade * 0.15 -> 1 each
    assert all(r["image"].size == (24, 24) and r["image"].mode == "RGB" and r["mask"] is None for r in rows)


def test_idrid_macular_edema_task_reads_the_column_with_the_trailing_space(idrid_root: Path):
    source = load_source(params("idrid", idrid_root, idrid_task="macular_edema"))
    assert source.class_names == ["no_dme_risk", "dme_risk_1", "dme_risk_2"]
    labels = {e.id: e.label for e in source.entries}
    assert all(labels[f"train-{name}"] == dme for name, (_, dme) in TRAIN_GRADES.items())


def test_idrid_right_eyes_are_flipped_so_every_optic_disc_is_on_the_left(idrid_root: Path):
    rows = records("idrid", idrid_root, image_size=32)
    flipped = {r["id"].split("-", 1)[1] for r in rows if r["flipped"]}
    assert flipped == RIGHT_EYES
    for row in rows:
        # the disc is the only yellowish-white paint (much more blue than the red fundus)
        disc_columns = np.nonzero(np.asarray(row["image"])[..., 2] > 90)[1]
        assert disc_columns.size and disc_columns.mean() < 16, row["id"]


def test_idrid_accepts_the_archive_folder_around_disease_grading(tmp_path: Path):
    make_idrid(tmp_path / "IDRiD" / "B. Disease Grading", {"IDRiD_001": (1, 0), "IDRiD_002": (0, 0)}, {"IDRiD_001": (0, 1)})
    assert len(load_source(params("idrid", tmp_path / "IDRiD"))) == 3


def test_idrid_missing_folder_names_it(tmp_path: Path):
    with pytest.raises(DataError, match="nowhere"):
        load_source(params("idrid", tmp_path / "nowhere"))


def test_idrid_missing_label_csv_names_the_groundtruth_folder(idrid_root: Path):
    csv = next((idrid_root / "B. Disease Grading" / "2. Groundtruths").glob("b.*Testing*.csv"))
    csv.unlink()
    with pytest.raises(DataError, match="2. Groundtruths.*Testing Labels"):
        load_source(params("idrid", idrid_root))


def test_idrid_image_named_in_the_csv_but_absent_names_the_file(idrid_root: Path):
    (idrid_root / "B. Disease Grading" / "1. Original Images" / "a. Training Set" / "IDRiD_007.jpg").unlink()
    with pytest.raises(DataError, match=r"a\. Training Set/IDRiD_007\.jpg.*Training Labels\.csv line 8"):
        load_source(params("idrid", idrid_root))


def test_idrid_out_of_range_grade_names_the_csv_line(idrid_root: Path):
    csv = idrid_root / "B. Disease Grading" / "2. Groundtruths" / "b. IDRiD_Disease Grading_Testing Labels.csv"
    write_idrid_csv(csv, {**TEST_GRADES, "IDRiD_003": (7, 0)}, padded=False)
    with pytest.raises(DataError, match=r"Testing Labels\.csv:4: .*IDRiD_003 is 7"):
        load_source(params("idrid", idrid_root))


def test_idrid_corrupt_image_names_the_file_when_decoded(idrid_root: Path):
    bad = idrid_root / "B. Disease Grading" / "1. Original Images" / "b. Testing Set" / "IDRiD_004.jpg"
    corrupt_image(bad)
    source = load_source(params("idrid", idrid_root))
    with pytest.raises(DataError, match=r"b\. Testing Set/IDRiD_004\.jpg: not a readable image"):
        list(source.records(progress=False))


# --- JAFFE -----------------------------------------------------------------------------------

JAFFE_RATINGS = {
    #           HAP   SAD   SUR   ANG   DIS   FEA
    "KA-AN1": (1.5, 2.0, 1.2, 4.1, 3.9, 1.0),
    "KA-HA1": (4.8, 1.1, 1.9, 1.0, 1.0, 1.1),
    "KM-FE2": (1.0, 2.9, 3.0, 1.3, 1.2, 3.3),
    "NA-SU1": (2.0, 1.0, 4.4, 1.0, 1.0, 2.1),
    "YM-SA3": (1.0, 3.9, 1.0, 1.8, 2.2, 2.5),
}


def test_jaffe_label_is_the_emotion_with_the_highest_rating(tmp_path: Path):
    make_jaffe(tmp_path, JAFFE_RATINGS)
    source = load_source(params("jaffe", tmp_path))
    assert source.class_names == ["happiness", "sadness", "surprise", "anger", "disgust", "fear"]
    labels = {e.id: source.class_names[e.label] for e in source.entries}
    assert labels == {"KA.AN1.30": "anger", "KA.HA1.31": "happiness", "KM.FE2.32": "fear",
                      "NA.SU1.33": "surprise", "YM.SA3.34": "sadness"}
    rows = list(source.records(progress=False))
    assert all(r["image"].mode == "RGB" and r["image"].size == (24, 24) for r in rows)
    channels = np.asarray(rows[0]["image"])
    assert (channels[..., 0] == channels[..., 1]).all() and (channels[..., 1] == channels[..., 2]).all()


def test_jaffe_without_the_fear_column_has_five_classes(tmp_path: Path):
    make_jaffe(tmp_path, JAFFE_RATINGS, with_fear=False)
    source = load_source(params("jaffe", tmp_path))
    assert source.class_names == ["happiness", "sadness", "surprise", "anger", "disgust"]
    labels = {e.id: source.class_names[e.label] for e in source.entries}
    assert labels["KM.FE2.32"] == "surprise"  # fear (3.3) is not a column any more: SUR 3.0 wins


def test_jaffe_prefers_the_table_with_the_fear_column_when_the_readme_has_two(tmp_path: Path):
    make_jaffe(tmp_path, JAFFE_RATINGS, also_without_fear=True)
    source = load_source(params("jaffe", tmp_path))
    assert len(source.class_names) == 6
    assert {e.id: source.class_names[e.label] for e in source.entries}["KM.FE2.32"] == "fear"


def test_jaffe_malformed_rating_row_names_the_line(tmp_path: Path):
    make_jaffe(tmp_path, JAFFE_RATINGS)
    readme = tmp_path / "jaffedbase" / "A_README_FIRST.txt"
    readme.write_text(readme.read_text().replace("4.80", "high"))
    with pytest.raises(DataError, match=r"A_README_FIRST\.txt:6: a rating is not a number"):
        load_source(params("jaffe", tmp_path))


def test_jaffe_skips_unrated_images(tmp_path: Path):
    make_jaffe(tmp_path, JAFFE_RATINGS)
    Image.new("L", (32, 32)).save(tmp_path / "jaffedbase" / "UY.DI1.99.tiff")
    assert "UY.DI1.99" not in {e.id for e in load_source(params("jaffe", tmp_path)).entries}


def test_jaffe_missing_rating_file_is_a_data_error(tmp_path: Path):
    make_jaffe(tmp_path, JAFFE_RATINGS)
    (tmp_path / "jaffedbase" / "A_README_FIRST.txt").unlink()
    with pytest.raises(DataError, match="rating file not found"):
        load_source(params("jaffe", tmp_path))


def test_jaffe_rated_image_that_is_absent_names_the_rating_line(tmp_path: Path):
    make_jaffe(tmp_path, JAFFE_RATINGS)
    (tmp_path / "jaffedbase" / "KM.FE2.32.tiff").unlink()
    with pytest.raises(DataError, match=r"KM\.FE2\.<n>\.tiff .*A_README_FIRST\.txt:7"):
        load_source(params("jaffe", tmp_path))


# --- NIH malaria -----------------------------------------------------------------------------


def test_malaria_labels_splits_and_ignored_thumbs_db(tmp_path: Path):
    make_malaria(tmp_path, n_parasitized=10, n_uninfected=20)
    rows = records("malaria", tmp_path, val_fraction=0.2, test_fraction=0.3)
    assert len(rows) == 30
    counts = Counter((r["label_name"], r["split"]) for r in rows)
    assert counts == Counter({("uninfected", "train"): 10, ("uninfected", "val"): 4, ("uninfected", "test"): 6,
                              ("parasitized", "train"): 5, ("parasitized", "val"): 2, ("parasitized", "test"): 3})
    assert all(r["label"] == (r["label_name"] == "parasitized") for r in rows)
    assert {r["image"].size for r in rows} == {(24, 24)}


def test_malaria_accepts_the_cell_images_folder_itself(tmp_path: Path):
    make_malaria(tmp_path, 2, 2)
    assert len(load_source(params("malaria", tmp_path / "cell_images"))) == 4


def test_malaria_missing_class_folder_names_it(tmp_path: Path):
    make_malaria(tmp_path, 2, 2)
    for path in (tmp_path / "cell_images" / "Uninfected").iterdir():
        path.unlink()
    (tmp_path / "cell_images" / "Uninfected").rmdir()
    with pytest.raises(DataError, match="cell_images/Uninfected"):
        load_source(params("malaria", tmp_path))


# --- ImageFolder -----------------------------------------------------------------------------


def test_imagefolder_without_split_folders_is_split_stratified(tmp_path: Path):
    make_imagefolder(tmp_path, {"cat": 10, "dog": 20})
    source = load_source(params("imagefolder", tmp_path, val_fraction=0.1, test_fraction=0.2))
    assert source.class_names == ["cat", "dog"]
    counts = Counter((source.class_names[e.label], e.split) for e in source.entries)
    assert counts == Counter({("cat", "train"): 7, ("cat", "val"): 1, ("cat", "test"): 2,
                              ("dog", "train"): 14, ("dog", "val"): 2, ("dog", "test"): 4})
    rows = list(source.records(progress=False))
    assert rows[0]["image"].mode == "RGB" and rows[0]["image"].size == (24, 24)  # grey PNGs become RGB


def test_imagefolder_keeps_predefined_splits_and_carves_val_from_train(tmp_path: Path):
    make_imagefolder(tmp_path, {"a": 10, "b": 10}, splits=("train", "test"))
    entries = load_source(params("imagefolder", tmp_path, val_fraction=0.2)).entries
    by_folder = Counter((e.extras["source_file"].split("/")[0], e.split) for e in entries)
    assert by_folder == Counter({("train", "train"): 16, ("train", "val"): 4, ("test", "test"): 20})


def test_imagefolder_with_one_class_is_a_data_error(tmp_path: Path):
    make_imagefolder(tmp_path, {"only": 3})
    with pytest.raises(DataError, match="at least 2 class folders"):
        load_source(params("imagefolder", tmp_path))


def test_imagefolder_corrupt_image_names_the_file(tmp_path: Path):
    make_imagefolder(tmp_path, {"a": 2, "b": 2})
    corrupt_image(tmp_path / "b" / "img_1.png")
    with pytest.raises(DataError, match=r"b/img_1\.png: not a readable image"):
        records("imagefolder", tmp_path)


def test_a_source_without_root_is_a_param_error():
    with pytest.raises(ParamError, match="data.root"):
        load_source(DataParams(source="malaria", root=None))
