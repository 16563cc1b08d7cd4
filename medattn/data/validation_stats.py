"""The tables the validation suite runs on: one row per image, one row per split.

The Great Expectations suite never opens a file itself; it checks columns computed here
(readable, size, channels, recomputed sha256, mask properties, leakage flag, ...). Keeping the
file reading in plain Python means every failure reason can be put into words (``image file is
truncated``) and the suite stays a list of declarative column expectations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from medattn.data.manifest import SPLITS, sha256_file

# the contract's mask values: 0 = background, 255 = lesion
MASK_VALUES = frozenset({0, 255})


def compute_image_stats(dataset_dir: Path, manifest: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per manifest row: the manifest columns plus what the files actually contain.

    Columns that cannot be measured (the size of an unreadable image, the mask columns of a
    row without a mask) are None, which the suite's column expectations skip as missing: each
    defect is then reported once, by the expectation that is about it.
    """
    records = manifest.to_dict("records")
    rows = []
    for position, record in enumerate(tqdm(records, desc="validate: reading images", unit="img", disable=None)):
        row: dict[str, Any] = dict(record)
        row["row"] = position
        row["manifest_line"] = position + 2  # 1-based, after the header line
        label = int(record["label"])
        row["expected_label_name"] = class_names[label] if 0 <= label < len(class_names) else None
        row.update(_image_columns(dataset_dir, str(record["path"])))
        row.update(_mask_columns(dataset_dir, str(record["mask_path"]), row["size"]))
        rows.append(row)
    stats = pd.DataFrame(rows)
    # nullable ints: one unreadable image must not turn every width/channel count into a float
    stats = stats.astype({column: "Int64" for column in ("width", "height", "channels")})
    return _add_leakage_columns(stats)


def class_balance_table(stats: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per split (all of train/val/test, even when empty): class counts and their ratio.

    ``class_ratio`` = images of the rarest declared class / images of the largest one, so a class
    missing from a split gives 0. Rows with an unknown label or split are left out here; their
    own expectations report them.
    """
    known = stats[stats["label"].between(0, len(class_names) - 1) & stats["split"].isin(SPLITS)]
    counts = pd.crosstab(known["split"], known["label"]).reindex(
        index=list(SPLITS), columns=range(len(class_names)), fill_value=0
    )
    rows = []
    for split in SPLITS:
        per_class = counts.loc[split]
        total = int(per_class.sum())
        rarest, largest = int(per_class.idxmin()), int(per_class.idxmax())
        rows.append({
            "split": split,
            "n_images": total,
            "class_counts": {class_names[c]: int(per_class[c]) for c in range(len(class_names))},
            "rarest_class": class_names[rarest],
            "rarest_count": int(per_class[rarest]),
            "largest_class": class_names[largest],
            "largest_count": int(per_class[largest]),
            # an empty split has no ratio; the split_not_empty expectation reports it instead
            "class_ratio": float(per_class[rarest] / per_class[largest]) if total else None,
        })
    return pd.DataFrame(rows)


def _image_columns(dataset_dir: Path, rel_path: str) -> dict[str, Any]:
    columns: dict[str, Any] = {
        "image_readable": False, "image_error": None, "sha256_actual": None,
        "width": None, "height": None, "size": None, "mode": None, "channels": None,
        "mean_intensity": None, "intensity_std": None,
    }
    path, problem = _resolve_inside(dataset_dir, rel_path)
    if problem:
        columns["image_error"] = problem
        return columns
    columns["sha256_actual"] = sha256_file(path)
    try:
        image = _load_image(path)
    except Exception as exc:  # any decoder failure (OSError, SyntaxError, ValueError...) = unreadable
        columns["image_error"] = _error_text(exc)
        return columns
    pixels = np.asarray(image, dtype=np.float32)
    columns.update(
        image_readable=True,
        width=image.width,
        height=image.height,
        size=f"{image.width}x{image.height}",
        mode=image.mode,
        channels=len(image.getbands()),
        mean_intensity=round(float(pixels.mean()), 3),
        intensity_std=round(float(pixels.std()), 3),
    )
    return columns


def _mask_columns(dataset_dir: Path, rel_path: str, image_size: str | None) -> dict[str, Any]:
    columns: dict[str, Any] = {
        "mask_declared": bool(rel_path), "mask_readable": None, "mask_error": None,
        "mask_size": None, "mask_mode": None, "mask_matches_image": None,
        "mask_is_binary": None, "mask_values": None, "mask_fraction": None,
    }
    if not rel_path:
        return columns
    path, problem = _resolve_inside(dataset_dir, rel_path)
    if problem:
        columns.update(mask_readable=False, mask_error=problem)
        return columns
    try:
        mask = _load_image(path)
    except Exception as exc:  # as for images: every decoder failure means unreadable
        columns.update(mask_readable=False, mask_error=_error_text(exc))
        return columns
    values = np.unique(np.asarray(mask))
    mask_size = f"{mask.width}x{mask.height}"
    columns.update(
        mask_readable=True,
        mask_size=mask_size,
        mask_mode=mask.mode,
        mask_matches_image=None if image_size is None else mask_size == image_size,
        mask_is_binary=mask.mode == "L" and set(values.tolist()) <= MASK_VALUES,
        mask_values=", ".join(str(v) for v in values[:6].tolist()) + (", ..." if len(values) > 6 else ""),
        mask_fraction=round(float((np.asarray(mask) == 255).mean()), 5) if mask.mode == "L" else None,
    )
    return columns


def _add_leakage_columns(stats: pd.DataFrame) -> pd.DataFrame:
    """Flag rows whose image bytes also appear under another split (train/test leakage).

    Identity is the recomputed sha256 (what the file holds now), falling back to the manifest's
    digest for a missing file. All rows of a leaking group share one text naming the group, so
    the report lists a pair once: ``img_0012 (train) duplicates img_0400 (test)``.
    """
    content = stats["sha256_actual"].where(stats["sha256_actual"].notna(), stats["sha256"])
    stats = stats.assign(content_sha256=content, leaks_across_splits=False, duplicate_of=None)
    for _, group in stats.groupby("content_sha256", sort=False):
        if group["split"].nunique() < 2:
            continue
        named = [f"{row.id} ({row.split})" for row in group.itertuples()]
        text = f"{named[0]} duplicates {', '.join(named[1:])}"
        stats.loc[group.index, "leaks_across_splits"] = True
        stats.loc[group.index, "duplicate_of"] = text
    return stats


def _resolve_inside(dataset_dir: Path, rel_path: str) -> tuple[Path, str | None]:
    """``dataset_dir / rel_path``, or a reason why that is not a file inside the dataset."""
    path = dataset_dir / rel_path
    if not rel_path or Path(rel_path).is_absolute() or ".." in Path(rel_path).parts:
        return path, f"path {rel_path!r} is not relative to the dataset folder"
    if not path.is_file():
        return path, "file not found"
    return path, None


def _load_image(path: Path) -> Image.Image:
    # verify() checks the PNG chunk CRCs even when a caller elsewhere set LOAD_TRUNCATED_IMAGES,
    # then a fresh open + load decodes every pixel (verify leaves the image unusable)
    with Image.open(path) as probe:
        probe.verify()
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _error_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
