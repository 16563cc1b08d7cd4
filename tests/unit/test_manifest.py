"""The prepared-dataset contract: write, read back, refuse bad input without leaving debris."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medattn.data.manifest import (
    MANIFEST_COLUMNS,
    read_class_names,
    read_manifest,
    sha256_file,
    write_prepared_dataset,
)
from medattn.errors import DataError

CLASSES = ["cat", "dog"]
SIZE = 8


def _record(index: int, label: int, split: str, with_mask: bool = True, **extras) -> dict:
    rng = np.random.default_rng(index)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = None
    if with_mask:
        mask = Image.fromarray(np.where(rng.random((SIZE, SIZE)) > 0.5, 255, 0).astype(np.uint8))
    return {"id": f"img_{index}", "image": image, "label": label, "label_name": CLASSES[label],
            "split": split, "mask": mask, **extras}


def _records() -> list[dict]:
    return [
        _record(0, 0, "train", has_decoy=0),
        _record(1, 1, "train", has_decoy=1),
        _record(2, 0, "val", with_mask=False, has_decoy=0),
        _record(3, 1, "test", has_decoy=0),
    ]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_keeps_columns_types_and_hashes(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    manifest_path = write_prepared_dataset(out, _records(), CLASSES, "unit", SIZE)
    assert manifest_path == out / "manifest.csv"

    frame = read_manifest(out)
    assert tuple(frame.columns) == MANIFEST_COLUMNS + ("has_decoy",)
    assert frame["id"].tolist() == ["img_0", "img_1", "img_2", "img_3"]
    assert frame["label"].tolist() == [0, 1, 0, 1]
    assert frame["label"].dtype.kind == "i"
    assert frame["split"].tolist() == ["train", "train", "val", "test"]
    assert frame["mask_path"].tolist() == ["masks/img_0.png", "masks/img_1.png", "", "masks/img_3.png"]
    assert frame["has_decoy"].tolist() == [0, 1, 0, 0]
    for row in frame.itertuples():
        image_file = out / row.path
        assert row.sha256 == hashlib.sha256(image_file.read_bytes()).hexdigest()
        with Image.open(image_file) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    written = np.asarray(Image.open(out / "images/img_1.png"))
    assert np.array_equal(written, np.asarray(_records()[1]["image"]))
    assert np.array_equal(np.asarray(Image.open(out / "masks/img_0.png")), np.asarray(_records()[0]["mask"]))

    assert read_class_names(out) == CLASSES
    assert json.loads((out / "classes.json").read_text()) == {"class_names": CLASSES, "source": "unit", "image_size": SIZE}
    assert _leftovers(tmp_path) == []


def test_rewrite_replaces_the_whole_folder(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    write_prepared_dataset(out, _records(), CLASSES, "unit", SIZE)
    write_prepared_dataset(out, _records()[:2], CLASSES, "unit", SIZE)
    assert read_manifest(out)["id"].tolist() == ["img_0", "img_1"]
    assert not (out / "images/img_3.png").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": Image.new("RGB", (SIZE + 1, SIZE))}, "RGB PIL image of 8x8"),
        ({"image": Image.new("L", (SIZE, SIZE))}, "RGB PIL image"),
        ({"mask": Image.new("L", (SIZE, SIZE), 1)}, "mask values must be 0 or 255"),
        ({"label": 2}, "label must be an int in [0, 1]"),
        ({"label_name": "dog"}, "label_name 'dog'"),
        ({"split": "holdout"}, "split must be one of"),
        ({"id": "../escape"}, "id must be"),
        ({"id": "img_0"}, "duplicate id"),
    ],
)
def test_bad_record_raises_and_leaves_existing_dataset_intact(tmp_path: Path, change: dict, message: str) -> None:
    out = tmp_path / "prepared"
    write_prepared_dataset(out, _records(), CLASSES, "unit", SIZE)
    before = (out / "manifest.csv").read_bytes()
    bad = _records()
    bad[2].update(change)
    with pytest.raises(DataError, match=re.escape(message)):
        write_prepared_dataset(out, bad, CLASSES, "unit", SIZE)
    assert (out / "manifest.csv").read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_no_records_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no records"):
        write_prepared_dataset(tmp_path / "prepared", [], CLASSES, "unit", SIZE)
    assert list(tmp_path.iterdir()) == []


def _write_manifest_text(tmp_path: Path, text: str) -> Path:
    (tmp_path / "manifest.csv").write_text(text)
    return tmp_path


HEADER = ",".join(MANIFEST_COLUMNS)


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,path,label,split,mask_path,sha256\na,images/a.png,0,train,,ab\n", "columns must start with"),
        (f"{HEADER}\na,images/a.png,zero,cat,train,,ab\n", "line 2: label must be a non-negative integer"),
        (f"{HEADER}\na,images/a.png,0,cat,train,,ab\nb,images/b.png,-1,cat,train,,ab\n", "line 3: label"),
        (f"{HEADER}\na,images/a.png,0,cat,holdout,,ab\n", "line 2: split must be one of"),
        (f"{HEADER}\na,images/a.png,0,cat,train,,ab\na,images/b.png,0,cat,val,,cd\n", "line 3: duplicate id 'a'"),
        (f"{HEADER}\na,images/a.png,0,cat,train,,\n", "line 2: sha256 is empty"),
        (f"{HEADER}\n", "has no rows"),
        ("", "not a readable CSV"),
    ],
)
def test_malformed_manifest_raises_data_error_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    folder = _write_manifest_text(tmp_path, text)
    with pytest.raises(DataError, match="manifest.csv") as caught:
        read_manifest(folder)
    assert message in str(caught.value)


def test_missing_manifest_and_classes_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.csv: manifest not found"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match=r"classes\.json: classes file not found"):
        read_class_names(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"class_names": []}', '{"class_names": [1, 2]}', "[]"])
def test_malformed_classes_file_raises(tmp_path: Path, content: str) -> None:
    (tmp_path / "classes.json").write_text(content)
    with pytest.raises(DataError, match=r"classes\.json"):
        read_class_names(tmp_path)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # more than one read chunk
    target = tmp_path / "blob.bin"
    target.write_bytes(payload)
    assert sha256_file(target) == hashlib.sha256(payload).hexdigest()
