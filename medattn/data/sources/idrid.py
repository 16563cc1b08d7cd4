"""IDRiD part "B. Disease Grading" (Porwal et al., 2018) in its published layout.

::

    root/                                   the "B. Disease Grading" folder (or a folder holding it)
      1. Original Images/a. Training Set/IDRiD_001.jpg ...       413 photographs, 4288 x 2848
      1. Original Images/b. Testing Set/IDRiD_001.jpg ...        103 photographs
      2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
      2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv

The CSVs have the columns ``Image name``, ``Retinopathy grade`` and ``Risk of macular edema ``
(the real header has a trailing space and the training file trailing empty columns): headers
are matched ignoring case and whitespace, empty columns and blank rows are dropped. The task
is ``data.idrid_task``: ``retinopathy`` (grades 0-4) or ``macular_edema`` (risk 0-2).
Split: the official testing set is ``test``; ``val`` is carved from the official training set,
stratified by grade, with ``data.val_fraction`` of it (``data.test_fraction`` is unused).

Pre-processing, after seed 001 (appendix 1.1):

1. *Crop* the black background columns: x < 260 and x > 3685 of a 4288-pixel-wide photograph.
   For any other width W both bounds are scaled by W / 4288 (a resized copy of the set keeps
   the same field of view).
2. *Area resize* the remaining 3426 x 2848 field to ``image_size`` squared (cv2.INTER_AREA in
   the paper, PIL's BOX filter here: the same pixel averaging).
3. *Flip right eyes* so every eye faces the same way. IDRiD does not record laterality, so it
   is read from the image. In a macula-centred fundus photograph the optic disc lies on the
   nasal side of the macula, which is the right side of the image for a right eye and the left
   side for a left eye. The disc is the brightest large region
   (:func:`medattn.data.preprocess.optic_disc_side`); photographs with the disc in the right
   half are mirrored, so every prepared image has its optic disc on the left. The manifest
   column ``flipped`` records the decision per image. (Seed 001 lists the indices it flipped;
   agreement of this rule with that list has not been checked on the real photographs.)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from medattn.config import DataParams
from medattn.data.preprocess import area_resize, crop_columns, flip_horizontal, optic_disc_side, to_rgb
from medattn.data.sources.common import (
    SourceDataset,
    Transform,
    carve_splits,
    list_images,
    require_dir,
    safe_id,
    source_entry,
    subfolders,
)
from medattn.errors import DataError, ParamError

log = logging.getLogger(__name__)

REFERENCE_WIDTH = 4288
FIRST_KEPT_COLUMN = 260
LAST_KEPT_COLUMN = 3685

IMAGE_NAME_COLUMN = "image name"
TASK_COLUMNS: dict[str, str] = {"retinopathy": "retinopathy grade", "macular_edema": "risk of macular edema"}
TASK_CLASSES: dict[str, list[str]] = {
    "retinopathy": ["no_dr", "mild_npdr", "moderate_npdr", "severe_npdr", "pdr"],
    "macular_edema": ["no_dme_risk", "dme_risk_1", "dme_risk_2"],
}
OFFICIAL_SETS: tuple[tuple[str, str], ...] = (("train", "training"), ("test", "testing"))


def crop_bounds(width: int) -> tuple[int, int]:
    """First and last kept column (inclusive) for a photograph ``width`` pixels wide."""
    scale = width / REFERENCE_WIDTH
    first = math.floor(FIRST_KEPT_COLUMN * scale + 0.5)
    last = min(width - 1, math.floor(LAST_KEPT_COLUMN * scale + 0.5))
    return first, last


def preprocess_fundus(image: Image.Image, image_size: int) -> tuple[Image.Image, bool]:
    """Crop, area-resize and (for a right eye) mirror one photograph; returns (image, flipped)."""
    rgb = to_rgb(image)
    cropped = crop_columns(rgb, *crop_bounds(rgb.width))
    flipped = optic_disc_side(cropped) == "right"
    resized = area_resize(cropped, image_size)
    return (flip_horizontal(resized) if flipped else resized), flipped


def load_idrid(root: Path, data: DataParams) -> SourceDataset:
    """Index IDRiD disease grading at ``root`` for ``data.idrid_task``; DataError on any layout problem."""
    if data.idrid_task not in TASK_COLUMNS:
        raise ParamError(f"params.yaml: data.idrid_task must be one of {', '.join(TASK_COLUMNS)}, "
                         f"got {data.idrid_task!r}")
    base = _find_base(require_dir(root, "IDRiD disease grading dataset"))
    images_dir = _child(base, "original images", "folder '1. Original Images'")
    labels_dir = _child(base, "groundtruths", "folder '2. Groundtruths'")
    class_names = TASK_CLASSES[data.idrid_task]
    found: list[tuple[str, Path, int]] = []  # (official set, image, label)
    for official, keyword in OFFICIAL_SETS:
        set_dir = _child(images_dir, keyword, f"folder '{keyword.title()} Set'")
        csv_path = _child(labels_dir, keyword, f"'{keyword.title()} Labels.csv'", want_file=True)
        grades = read_grades(csv_path, data.idrid_task, len(class_names))
        found.extend((official, path, label) for path, label in _match_images(set_dir, csv_path, grades))
    splits = carve_splits([official for official, _, _ in found], [label for _, _, label in found],
                          data.val_fraction, 0.0, data.split_seed)
    entries = [
        source_entry(f"{official}-{safe_id(path.stem)}", path, label, split, base)
        for (official, path, label), split in zip(found, splits)
    ]
    return SourceDataset("idrid", root, class_names, entries, _fundus_transform(data.image_size))


def _fundus_transform(image_size: int) -> Transform:
    def transform(image: Image.Image) -> tuple[Image.Image, dict[str, Any]]:
        prepared, flipped = preprocess_fundus(image, image_size)
        return prepared, {"flipped": flipped}

    return transform


def read_grades(csv_path: Path, task: str, n_classes: int) -> dict[str, tuple[int, int]]:
    """``{image name: (grade, csv line)}`` for ``task`` from one IDRiD label CSV."""
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({exc.__class__.__name__})") from exc
    columns = {_normalise(str(c)): c for c in frame.columns}
    for wanted in (IMAGE_NAME_COLUMN, TASK_COLUMNS[task]):
        if wanted not in columns:
            raise DataError(f"{csv_path}: no column {wanted!r} (columns: {', '.join(map(str, frame.columns))})")
    grades: dict[str, tuple[int, int]] = {}
    for offset, (name, grade) in enumerate(zip(frame[columns[IMAGE_NAME_COLUMN]], frame[columns[TASK_COLUMNS[task]]])):
        line = offset + 2  # 1-based, after the header
        name = Path(name.strip()).stem  # the CSV names images without extension; tolerate one
        if not name:
            continue  # the training CSV ends with blank rows
        try:
            value = int(grade.strip())
        except ValueError:
            raise DataError(f"{csv_path}:{line}: {TASK_COLUMNS[task]} of {name} is {grade!r}, not an integer") from None
        if not 0 <= value < n_classes:
            raise DataError(f"{csv_path}:{line}: {TASK_COLUMNS[task]} of {name} is {value}, expected 0..{n_classes - 1}")
        if name in grades:
            raise DataError(f"{csv_path}:{line}: {name} is listed twice (first on line {grades[name][1]})")
        grades[name] = (value, line)
    if not grades:
        raise DataError(f"{csv_path}: no labelled rows")
    return grades


def _match_images(set_dir: Path, csv_path: Path, grades: dict[str, tuple[int, int]]) -> list[tuple[Path, int]]:
    """(image, label) in name order for every CSV row; DataError if a named image is absent."""
    by_name: dict[str, Path] = {}
    for path in list_images(set_dir):
        if path.stem in by_name:
            raise DataError(f"{path}: a second image named {path.stem} (the first is {by_name[path.stem].name})")
        by_name[path.stem] = path
    matched: list[tuple[Path, int]] = []
    for name, (label, line) in sorted(grades.items()):
        if name not in by_name:
            raise DataError(f"{set_dir / (name + '.jpg')}: image named in {csv_path.name} line {line} not found")
        matched.append((by_name.pop(name), label))
    for name, path in sorted(by_name.items()):
        log.warning("%s: not listed in %s; image skipped", path, csv_path)
    return matched


def _normalise(name: str) -> str:
    return " ".join(name.split()).lower()


def _find_base(root: Path) -> Path:
    """``root`` itself, or the single 'Disease Grading' folder inside it (archives nest it)."""
    base = root
    for _ in range(3):
        if any("groundtruth" in _normalise(p.name) for p in subfolders(base)):
            return base
        inner = [p for p in subfolders(base) if "disease grading" in _normalise(p.name)]
        if len(inner) != 1:
            break
        base = inner[0]
    raise DataError(f"{root}: not an IDRiD disease grading folder "
                    "(expected '1. Original Images' and '2. Groundtruths' in it)")


def _child(parent: Path, keyword: str, what: str, want_file: bool = False) -> Path:
    """The one folder (or .csv file) in ``parent`` whose name contains ``keyword``."""
    if want_file:
        matches = [p for p in sorted(parent.iterdir())
                   if p.is_file() and p.suffix.lower() == ".csv" and keyword in _normalise(p.name)]
    else:
        matches = [p for p in subfolders(parent) if keyword in _normalise(p.name)]
    if not matches:
        kind = "CSV file" if want_file else "folder"
        raise DataError(f"{parent}: {what} not found (no {kind} whose name contains {keyword!r})")
    if len(matches) > 1:
        raise DataError(f"{parent}: several candidates for {what}: {', '.join(p.name for p in matches)}")
    return matches[0]
