"""prepare_dataset: dispatch on data.source and the all-or-nothing write of the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medattn.config import DataParams, Params, SyntheticParams
from medattn.data.manifest import MANIFEST_COLUMNS, read_class_names, read_manifest, sha256_file
from medattn.data.prepare import prepare_dataset
from medattn.errors import DataError, ParamError
from tests.fixtures.real_layouts import corrupt_image, make_idrid, make_imagefolder


def params_for(source: str, root: Path | None = None, image_size: int = 20, **synthetic) -> Params:
    data = DataParams(source=source, root=str(root) if root else None, image_size=image_size,
                      synthetic=SyntheticParams(**synthetic))
    return Params(data=data)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_prepare_imagefolder_writes_the_contract(tmp_path: Path):
    make_imagefolder(tmp_path / "raw", {"benign": 6, "malignant": 4})
    out = prepare_dataset(params_for("imagefolder", tmp_path / "raw"), tmp_path / "prepared", progress=False)
    assert out == tmp_path / "prepared"
    manifest = read_manifest(out)
    assert tuple(manifest.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert "source_file" in manifest.columns
    assert len(manifest) == 10 and set(manifest["split"]) == {"train", "val", "test"}
    assert read_class_names(out) == ["benign", "malignant"]
    assert json.loads((out / "classes.json").read_text())["source"] == "imagefolder"
    for row in manifest.itertuples():
        image = Image.open(out / row.path)
        assert image.mode == "RGB" and image.size == (20, 20)
        assert sha256_file(out / row.path) == row.sha256
        assert row.mask_path == ""


def test_prepare_idrid_records_which_images_were_flipped(tmp_path: Path):
    make_idrid(tmp_path / "raw", {"IDRiD_001": (0, 0), "IDRiD_002": (3, 1)}, {"IDRiD_001": (4, 2)}, right_eyes={"IDRiD_002"})
    out = prepare_dataset(params_for("idrid", tmp_path / "raw"), tmp_path / "prepared", progress=False)
    manifest = read_manifest(out).set_index("id")
    assert manifest["flipped"].astype(str).to_dict() == {"train-IDRiD_001": "False", "train-IDRiD_002": "True",
                                                         "test-IDRiD_001": "False"}
    assert manifest.loc["test-IDRiD_001", "label_name"] == "pdr"


def test_prepare_synthetic_dispatches_to_the_generator(tmp_path: Path):
    out = prepare_dataset(params_for("synthetic", image_size=32, n_images=12), tmp_path / "prepared", progress=False)
    manifest = read_manifest(out)
    assert len(manifest) == 12
    assert json.loads((out / "classes.json").read_text())["source"] == "synthetic"
    assert Image.open(out / manifest["path"].iloc[0]).size == (32, 32)


def test_a_corrupt_image_halfway_leaves_no_output_folder(tmp_path: Path):
    make_imagefolder(tmp_path / "raw", {"a": 5, "b": 5})
    corrupt_image(tmp_path / "raw" / "b" / "img_3.png")  # decoded after several good images
    with pytest.raises(DataError, match="img_3.png"):
        prepare_dataset(params_for("imagefolder", tmp_path / "raw"), tmp_path / "out" / "prepared", progress=False)
    assert not (tmp_path / "out" / "prepared").exists()
    assert siblings(tmp_path / "out" / "prepared") == []  # no staging folder left behind either


def test_a_failing_source_keeps_the_previous_good_dataset(tmp_path: Path):
    make_imagefolder(tmp_path / "raw", {"a": 5, "b": 5})
    out = prepare_dataset(params_for("imagefolder", tmp_path / "raw"), tmp_path / "prepared", progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    corrupt_image(tmp_path / "raw" / "a" / "img_4.png")
    with pytest.raises(DataError, match="img_4.png"):
        prepare_dataset(params_for("imagefolder", tmp_path / "raw", image_size=24), out, progress=False)
    with pytest.raises(DataError, match="missing"):
        prepare_dataset(params_for("imagefolder", tmp_path / "missing"), out, progress=False)

    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert siblings(out) == ["prepared", "raw"]


def test_a_successful_run_replaces_the_previous_dataset(tmp_path: Path):
    make_imagefolder(tmp_path / "raw", {"a": 5, "b": 5})
    out = prepare_dataset(params_for("imagefolder", tmp_path / "raw"), tmp_path / "prepared", progress=False)
    (out / "stale.txt").write_text("from an earlier run")
    prepare_dataset(params_for("imagefolder", tmp_path / "raw", image_size=24), out, progress=False)
    assert not (out / "stale.txt").exists()
    first = read_manifest(out)["path"].iloc[0]
    assert np.asarray(Image.open(out / first)).shape == (24, 24, 3)
    assert siblings(out) == ["prepared", "raw"]


def test_an_output_folder_inside_the_raw_dataset_is_refused(tmp_path: Path):
    make_imagefolder(tmp_path / "raw", {"a": 3, "b": 3})
    with pytest.raises(ParamError, match="inside data.root"):
        prepare_dataset(params_for("imagefolder", tmp_path / "raw"), tmp_path / "raw" / "prepared", progress=False)
    assert not (tmp_path / "raw" / "prepared").exists()
