"""The prepared-dataset folder every later stage reads.

Layout (the shared data contract)::

    <dir>/images/<id>.png     RGB uint8, image_size x image_size
    <dir>/masks/<id>.png      optional lesion mask, mode "L", values 0 or 255
    <dir>/manifest.csv        id,path,label,label_name,split,mask_path,sha256[,extras...]
    <dir>/classes.json        {"class_names": [...], "source": "...", "image_size": N}

Writers build the whole folder next to the target and swap it in at the end, so a crash never
leaves a half-written dataset that DVC or a later stage could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from medattn.errors import DataError

MANIFEST_COLUMNS: tuple[str, ...] = ("id", "path", "label", "label_name", "split", "mask_path", "sha256")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"
CLASSES_FILE = "classes.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"

_RECORD_KEYS = frozenset({"id", "image", "label", "label_name", "split", "mask"})
# ids become file names: keep them portable and free of path separators
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so large images do not load at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_prepared_dataset(
    out_dir: str | Path,
    records: Iterable[Mapping[str, Any]],
    class_names: list[str] | tuple[str, ...],
    source: str,
    image_size: int,
) -> Path:
    """Write images, masks, ``manifest.csv`` and ``classes.json``; return the manifest path.

    ``records`` may be a generator (wrap it in tqdm for progress); each record is a mapping with
    ``id, image (PIL RGB), label, label_name, split, mask (PIL "L" or None)`` plus optional extra
    scalar keys, which become extra manifest columns in first-seen order. Any bad record raises
    DataError naming its id, and nothing at ``out_dir`` changes.
    """
    out_dir = Path(out_dir)
    class_names = list(class_names)
    if not class_names or not all(isinstance(n, str) and n for n in class_names):
        raise DataError(f"{out_dir}: class_names must be a non-empty list of non-empty strings, got {class_names!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rows = _write_files(staging, records, class_names, image_size)
        _write_manifest(staging / MANIFEST_FILE, rows)
        classes = {"class_names": class_names, "source": source, "image_size": int(image_size)}
        (staging / CLASSES_FILE).write_text(json.dumps(classes, indent=2) + "\n")
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / MANIFEST_FILE


def _write_files(
    staging: Path, records: Iterable[Mapping[str, Any]], class_names: list[str], image_size: int
) -> list[dict[str, Any]]:
    (staging / IMAGES_DIR).mkdir()
    (staging / MASKS_DIR).mkdir()
    rows: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    extra_keys: list[str] | None = None
    for record in records:
        record_id = _check_record(record, seen_ids, class_names, image_size)
        extras = [k for k in record if k not in _RECORD_KEYS]
        if extra_keys is None:
            extra_keys = extras
        elif set(extras) != set(extra_keys):
            raise DataError(f"record {record_id!r}: extra keys {sorted(extras)} differ from the first record's {sorted(extra_keys)}")
        image_rel = f"{IMAGES_DIR}/{record_id}.png"
        record["image"].save(staging / image_rel, format="PNG")
        mask_rel = ""
        if record["mask"] is not None:
            mask_rel = f"{MASKS_DIR}/{record_id}.png"
            record["mask"].save(staging / mask_rel, format="PNG")
        row = {
            "id": record_id,
            "path": image_rel,
            "label": int(record["label"]),
            "label_name": record["label_name"],
            "split": record["split"],
            "mask_path": mask_rel,
            "sha256": sha256_file(staging / image_rel),
        }
        row.update({k: record[k] for k in extra_keys})
        rows.append(row)
    if not rows:
        raise DataError(f"{staging.name}: no records to write (the dataset would be empty)")
    return rows


def _check_record(record: Mapping[str, Any], seen_ids: set[str], class_names: list[str], image_size: int) -> str:
    missing = sorted(_RECORD_KEYS - set(record))
    record_id = str(record.get("id", "?"))
    if missing:
        raise DataError(f"record {record_id!r}: missing keys {missing}")
    if not _SAFE_ID.match(record_id):
        raise DataError(f"record {record_id!r}: id must be letters, digits, '_', '-', '.' (it names the image file)")
    if record_id in seen_ids:
        raise DataError(f"record {record_id!r}: duplicate id")
    seen_ids.add(record_id)
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < len(class_names):
        raise DataError(f"record {record_id!r}: label must be an int in [0, {len(class_names) - 1}], got {label!r}")
    if record["label_name"] != class_names[label]:
        raise DataError(f"record {record_id!r}: label_name {record['label_name']!r} != class_names[{label}] {class_names[label]!r}")
    if record["split"] not in SPLITS:
        raise DataError(f"record {record_id!r}: split must be one of {', '.join(SPLITS)}, got {record['split']!r}")
    image = record["image"]
    if not isinstance(image, Image.Image) or image.mode != "RGB" or image.size != (image_size, image_size):
        got = f"{image.mode} {image.size}" if isinstance(image, Image.Image) else type(image).__name__
        raise DataError(f"record {record_id!r}: image must be an RGB PIL image of {image_size}x{image_size}, got {got}")
    mask = record["mask"]
    if mask is not None:
        if not isinstance(mask, Image.Image) or mask.mode != "L" or mask.size != image.size:
            got = f"{mask.mode} {mask.size}" if isinstance(mask, Image.Image) else type(mask).__name__
            raise DataError(f"record {record_id!r}: mask must be an 'L' PIL image of {image_size}x{image_size}, got {got}")
        # a 0/1 mask would silently read as empty if we thresholded it, so insist on 0/255
        values = np.unique(np.asarray(mask))
        if not set(values.tolist()) <= {0, 255}:
            raise DataError(f"record {record_id!r}: mask values must be 0 or 255, got {values[:5].tolist()}")
    return record_id


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False, lineterminator="\n")


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging`` with renames only (a directory cannot be os.replace'd onto)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    retired.rmdir()
    os.rename(out_dir, retired)
    os.rename(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def read_manifest(dataset_dir: str | Path) -> pd.DataFrame:
    """Load ``<dir>/manifest.csv`` with the contract's columns and types checked.

    ``label`` is int, the text columns are str (``mask_path`` is "" when there is no mask);
    extra columns are kept as pandas infers them. Raises DataError naming the file and line.
    """
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run the prepare stage first)")
    text_columns = {c: str for c in MANIFEST_COLUMNS}
    try:
        frame = pd.read_csv(path, dtype=text_columns, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    header = tuple(frame.columns[: len(MANIFEST_COLUMNS)])
    if header != MANIFEST_COLUMNS:
        raise DataError(f"{path}: columns must start with {','.join(MANIFEST_COLUMNS)}, got {','.join(map(str, frame.columns))}")
    if frame.empty:
        raise DataError(f"{path}: has no rows")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = frame.index[labels.isna() | (labels < 0) | (labels % 1 != 0)]
    if len(bad):
        raise DataError(f"{path}: line {bad[0] + 2}: label must be a non-negative integer, got {frame.at[bad[0], 'label']!r}")
    frame["label"] = labels.astype(int)
    bad = frame.index[~frame["split"].isin(SPLITS)]
    if len(bad):
        raise DataError(f"{path}: line {bad[0] + 2}: split must be one of {', '.join(SPLITS)}, got {frame.at[bad[0], 'split']!r}")
    for column in ("id", "path", "sha256"):
        bad = frame.index[frame[column].str.len() == 0]
        if len(bad):
            raise DataError(f"{path}: line {bad[0] + 2}: {column} is empty")
    duplicated = frame.index[frame["id"].duplicated()]
    if len(duplicated):
        raise DataError(f"{path}: line {duplicated[0] + 2}: duplicate id {frame.at[duplicated[0], 'id']!r}")
    return frame


def read_class_names(dataset_dir: str | Path) -> list[str]:
    """``class_names`` from ``<dir>/classes.json`` (index = label)."""
    path = Path(dataset_dir) / CLASSES_FILE
    if not path.is_file():
        raise DataError(f"{path}: classes file not found (run the prepare stage first)")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc.__class__.__name__})") from exc
    names = content.get("class_names") if isinstance(content, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: 'class_names' must be a non-empty list of strings")
    return names
