"""ManifestDataset, load_split_tensors and class_counts over a small prepared dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medattn.data.dataset import ManifestDataset, class_counts, load_split_tensors
from medattn.data.manifest import write_prepared_dataset
from medattn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from medattn.errors import DataError

SIZE = 16
CLASSES = ["healthy", "mild", "severe"]
# (id, label, split, has a lesion mask)
ROWS = [
    ("a0", 0, "train", False),
    ("a1", 0, "train", False),
    ("b0", 1, "train", True),
    ("c0", 2, "train", True),
    ("a2", 0, "val", False),
    ("c1", 2, "val", True),
    ("b1", 1, "test", True),
]


def pixel_value(index: int) -> tuple[int, int, int]:
    return (10 * index, 255 - 10 * index, 128)


def lesion_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[2:6, 3:9] = 255
    return Image.fromarray(mask, mode="L")


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    records = [
        {
            "id": rid,
            "image": Image.new("RGB", (SIZE, SIZE), pixel_value(i)),
            "label": label,
            "label_name": CLASSES[label],
            "split": split,
            "mask": lesion_mask() if masked else None,
        }
        for i, (rid, label, split, masked) in enumerate(ROWS)
    ]
    write_prepared_dataset(tmp_path / "prepared", records, CLASSES, "synthetic", SIZE)
    return tmp_path / "prepared"


def test_items_have_the_contract_shapes_types_and_normalisation(dataset_dir: Path):
    dataset = ManifestDataset(dataset_dir, "train")
    assert len(dataset) == 4 and dataset.ids == ["a0", "a1", "b0", "c0"]
    image, label, mask, has_mask = dataset[2]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert isinstance(label, int) and label == 1
    red, green, blue = pixel_value(2)
    expected = [(v / 255 - m) / s for v, m, s in zip((red, green, blue), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(image[:, 0, 0], torch.tensor(expected), atol=1e-6)
    assert mask.shape == (1, SIZE, SIZE) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0} and mask.sum() == 4 * 6
    assert has_mask is True


def test_rows_without_a_mask_get_zeros_and_has_mask_false(dataset_dir: Path):
    _, _, mask, has_mask = ManifestDataset(dataset_dir, "train")[0]
    assert has_mask is False and mask.shape == (1, SIZE, SIZE) and mask.sum() == 0


def test_custom_mean_and_std_are_applied(dataset_dir: Path):
    image, *_ = ManifestDataset(dataset_dir, "val", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))[0]
    assert torch.allclose(image[:, 5, 5], torch.tensor(pixel_value(4), dtype=torch.float32) / 255)


def test_training_input_equals_the_serving_input_for_the_same_image(dataset_dir: Path):
    dataset = ManifestDataset(dataset_dir, "test")
    served = to_model_input(Image.open(dataset_dir / "images" / "b1.png"), SIZE)
    assert torch.equal(dataset[0][0], served)


def test_several_splits_and_class_counts(dataset_dir: Path):
    dataset = ManifestDataset(dataset_dir, ("train", "val"))
    assert len(dataset) == 6
    assert dataset.class_counts() == [3, 1, 2]
    assert class_counts(dataset_dir, "train") == [2, 1, 1]
    assert class_counts(dataset_dir, "test") == [0, 1, 0]


def test_load_split_tensors_returns_uint8_pixels_and_labels(dataset_dir: Path):
    images, labels = load_split_tensors(dataset_dir, "val")
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert images[1, :, 0, 0].tolist() == list(pixel_value(5))
    assert labels.tolist() == [0, 2] and labels.dtype == torch.int64


def test_unknown_split_is_a_data_error(dataset_dir: Path):
    with pytest.raises(DataError, match="split must be"):
        ManifestDataset(dataset_dir, "validation")


def test_missing_image_file_names_it(dataset_dir: Path):
    (dataset_dir / "images" / "c1.png").unlink()
    with pytest.raises(DataError, match=r"images/c1\.png: image file not found"):
        ManifestDataset(dataset_dir, "val")


def test_image_of_another_size_names_it(dataset_dir: Path):
    Image.new("RGB", (SIZE + 1, SIZE)).save(dataset_dir / "images" / "a1.png")
    with pytest.raises(DataError, match=r"a1\.png: image is 17x16"):
        load_split_tensors(dataset_dir, "train")


def test_missing_manifest_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="manifest"):
        ManifestDataset(tmp_path, "train")
