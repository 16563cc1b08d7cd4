"""Bad snapshots stop the recalibration with one line, before anything is trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medattn.errors import DataError
from medattn.feedback.export import EXPORT_FORMAT
from medattn.feedback.recalibration import Figures, feedback_targets, gate, held_out, read_snapshot


def write_snapshot(folder: Path, size: int = 16, records: int = 1) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    lines = []
    for i in range(records):
        Image.fromarray(np.full((size, size, 3), (40 * i) % 256, np.uint8)).save(folder / f"images/{i}.png")
        Image.fromarray(np.full((size, size), 128, np.uint8)).save(folder / f"masks/{i}.png")
        lines.append(json.dumps({"id": f"id{i}", "image": f"images/{i}.png", "mask": f"masks/{i}.png",
                                 "image_sha256": "a" * 64, "corrected_label": None}))
    (folder / "feedback.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    (folder / "manifest.json").write_text(json.dumps({"format": EXPORT_FORMAT, "records": records}))
    return folder


def test_empty_corrupt_and_missing_snapshots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a feedback snapshot"):
        read_snapshot(tmp_path / "nothing")
    with pytest.raises(DataError, match="empty"):
        read_snapshot(write_snapshot(tmp_path / "empty", records=0))
    corrupt = write_snapshot(tmp_path / "corrupt")
    (corrupt / "feedback.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="feedback.jsonl:1: corrupt"):
        read_snapshot(corrupt)
    (corrupt / "manifest.json").write_text("[")
    with pytest.raises(DataError, match="corrupt"):
        read_snapshot(corrupt)


def test_images_of_another_size_than_the_model_input_are_refused(tmp_path: Path) -> None:
    records = read_snapshot(write_snapshot(tmp_path / "s", size=16))
    with pytest.raises(DataError, match="16x16 px, the model takes 32x32"):
        feedback_targets(records, ["a", "b"], 32, (0.5,) * 3, (0.25,) * 3)
    targets = feedback_targets(records, ["a", "b"], 16, (0.5,) * 3, (0.25,) * 3)
    assert targets.images.shape == (1, 3, 16, 16) and int(targets.masks.unique()[0]) == 128


def test_holdout_is_fixed_and_the_gate_needs_both_conditions(tmp_path: Path) -> None:
    records = read_snapshot(write_snapshot(tmp_path / "s", records=10))
    assert held_out(records, 0.2) == held_out(list(reversed(records)), 0.2) and len(held_out(records, 0.2)) == 2
    champion = Figures(0.80, 0.8, 0.2, 0.3)
    assert gate(champion, Figures(0.79, 0.8, 0.5, 0.1), 0.02)[0]
    assert not gate(champion, Figures(0.70, 0.7, 0.5, 0.1), 0.02)[0]  # inferior macro-F1
    assert not gate(champion, Figures(0.85, 0.9, 0.2, 0.3), 0.02)[0]  # no better agreement
    assert not gate(champion, Figures(0.85, 0.9, None, None), 0.02)[0]  # nothing held out
