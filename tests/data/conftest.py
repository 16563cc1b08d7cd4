"""Tiny prepared datasets (the shared data contract), written directly with PIL.

They are built by hand rather than with ``write_prepared_dataset`` because the data tests need
datasets that the writer would refuse (wrong sizes, bad masks, leaked images).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

MANIFEST_HEADER = ["id", "path", "label", "label_name", "split", "mask_path", "sha256"]
CLASS_NAMES = ["healthy", "lesion"]
IMAGE_SIZE = 16
# two classes alternate inside each split, so every split is exactly balanced
SPLIT_SIZES = {"train": 6, "val": 4, "test": 4}


def noise_image(seed: int, size: int = IMAGE_SIZE, mode: str = "RGB") -> Image.Image:
    """A random image: distinct seeds give distinct bytes (no accidental leakage)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def square_mask(size: int = IMAGE_SIZE, value: int = 255) -> Image.Image:
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[size // 4: size // 2, size // 4: size // 2] = value
    return Image.fromarray(pixels, mode="L")


class TinyDataset:
    """A prepared dataset folder plus edits that keep or break its manifest on purpose.

    The constants and image makers are attributes too, so test modules reach them through the
    fixture instead of importing this conftest by module name.
    """

    image_size = IMAGE_SIZE
    class_names = CLASS_NAMES
    noise_image = staticmethod(noise_image)
    square_mask = staticmethod(square_mask)

    def __init__(self, root: Path) -> None:
        self.root = root

    def rows(self) -> list[dict[str, str]]:
        with open(self.root / "manifest.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    def write_rows(self, rows: list[dict[str, str]]) -> None:
        with open(self.root / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=MANIFEST_HEADER, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    def row(self, image_id: str) -> dict[str, str]:
        return next(r for r in self.rows() if r["id"] == image_id)

    def ids(self, split: str | None = None, label: int | None = None) -> list[str]:
        return [r["id"] for r in self.rows()
                if (split is None or r["split"] == split) and (label is None or int(r["label"]) == label)]

    def update(self, image_id: str, **fields: str) -> None:
        """Change manifest fields of one row."""
        rows = self.rows()
        for row in rows:
            if row["id"] == image_id:
                row.update(fields)
        self.write_rows(rows)

    def image_path(self, image_id: str) -> Path:
        return self.root / self.row(image_id)["path"]

    def mask_path(self, image_id: str) -> Path:
        mask = self.row(image_id)["mask_path"]
        assert mask, f"{image_id} has no mask"
        return self.root / mask

    def replace_image(self, image_id: str, image: Image.Image, *, rehash: bool) -> None:
        """Overwrite the image file; ``rehash`` also records its new sha256 in the manifest."""
        path = self.image_path(image_id)
        image.save(path, format="PNG")
        if rehash:
            self.update(image_id, sha256=sha256_hex(path))


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tiny_dataset(root: Path) -> TinyDataset:
    """Images, lesion masks for label 1, manifest.csv and classes.json under ``root``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    index = 0
    for split, count in SPLIT_SIZES.items():
        for position in range(count):
            image_id = f"img_{index:04d}"
            label = position % 2
            image_rel = f"images/{image_id}.png"
            noise_image(seed=index).save(root / image_rel, format="PNG")
            mask_rel = ""
            if label == 1:
                mask_rel = f"masks/{image_id}.png"
                square_mask().save(root / mask_rel, format="PNG")
            rows.append({"id": image_id, "path": image_rel, "label": str(label), "label_name": CLASS_NAMES[label],
                         "split": split, "mask_path": mask_rel, "sha256": sha256_hex(root / image_rel)})
            index += 1
    dataset = TinyDataset(root)
    dataset.write_rows(rows)
    classes = {"class_names": CLASS_NAMES, "source": "synthetic", "image_size": IMAGE_SIZE}
    (root / "classes.json").write_text(json.dumps(classes))
    return dataset


@pytest.fixture(scope="session")
def clean_dataset(tmp_path_factory: pytest.TempPathFactory) -> TinyDataset:
    """A valid dataset, built once; tests that change data take ``dataset_copy`` instead."""
    return write_tiny_dataset(tmp_path_factory.mktemp("clean") / "prepared")


@pytest.fixture
def dataset_copy(clean_dataset: TinyDataset, tmp_path: Path) -> Iterator[TinyDataset]:
    root = tmp_path / "prepared"
    shutil.copytree(clean_dataset.root, root)
    yield TinyDataset(root)
