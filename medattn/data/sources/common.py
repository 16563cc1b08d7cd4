"""What every real-data loader shares: the on-disk index, lazy decoding, ids and splits.

A loader first *indexes* its dataset (lists folders, reads label files, checks that every
labelled image exists) and returns a :class:`SourceDataset`. Every problem with the layout is
raised then, before any pixel is decoded. Images are decoded one at a time only when
:meth:`SourceDataset.records` is iterated, so a full-resolution dataset never sits in memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from medattn.data.preprocess import area_resize, to_rgb
from medattn.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# A transform turns one decoded raw image into the prepared image plus extra manifest columns.
Transform = Callable[[Image.Image], tuple[Image.Image, dict[str, Any]]]


@dataclass(frozen=True)
class SourceEntry:
    """One labelled image found on disk, before its pixels are decoded."""

    id: str
    path: Path
    label: int
    split: str
    extras: Mapping[str, Any] = field(default_factory=dict)


def source_entry(id: str, path: Path, label: int, split: str, base: Path) -> SourceEntry:
    """An entry whose manifest column ``source_file`` is ``path`` relative to ``base``."""
    return SourceEntry(id=id, path=path, label=label, split=split,
                       extras={"source_file": path.relative_to(base).as_posix()})


@dataclass(frozen=True)
class SourceDataset:
    """An indexed dataset: class names, entries in a fixed order, and how to prepare a pixel."""

    name: str
    root: Path
    class_names: list[str]
    entries: list[SourceEntry]
    transform: Transform

    def __len__(self) -> int:
        return len(self.entries)

    def records(self, progress: bool = True) -> Iterator[dict[str, Any]]:
        """Decode and pre-process each entry into a record of the shared data contract."""
        for entry in tqdm(self.entries, desc=f"{self.name}: pre-processing", unit="img", disable=not progress):
            image, transform_extras = self.transform(open_image(entry.path))
            yield {
                "id": entry.id,
                "image": image,
                "label": entry.label,
                "label_name": self.class_names[entry.label],
                "split": entry.split,
                "mask": None,  # none of the real sources ships lesion masks for its grading task
                **entry.extras,
                **transform_extras,
            }


def resize_transform(image_size: int) -> Transform:
    """The transform of sources that need nothing but RGB and an area resize to a square."""

    def transform(image: Image.Image) -> tuple[Image.Image, dict[str, Any]]:
        return area_resize(to_rgb(image), image_size), {}

    return transform


def open_image(path: Path) -> Image.Image:
    """Decode an image file completely, or raise DataError naming it (missing, corrupt, truncated)."""
    try:
        with Image.open(path) as image:
            image.load()  # PIL decodes lazily: force it here so truncation fails now, with the path
            return image
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"{path}: not a readable image ({reason})") from exc


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found (expected a folder)")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden files (macOS ``._*``) skipped."""
    images = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted((p for p in images if not p.name.startswith(".")), key=lambda p: p.name)


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def safe_id(text: str) -> str:
    """Turn a file name or relative path into an id usable as a file name (letters, digits, ``_.-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)
    return cleaned or "image"


def unique_ids(candidates: Sequence[str]) -> list[str]:
    """Make ids unique in order: a repeat of ``x`` becomes ``x-2``, ``x-3`` (e.g. ``a.png`` next to ``a.jpg``)."""
    seen: set[str] = set()
    result: list[str] = []
    for candidate in candidates:
        unique, n = candidate, 1
        while unique in seen:
            n += 1
            unique = f"{candidate}-{n}"
        seen.add(unique)
        result.append(unique)
    return result


def stratified_split(labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Assign ``train`` / ``val`` / ``test`` per item, class by class, reproducibly from ``seed``.

    Each class contributes round(n * fraction) items to val and test (half rounds up), but
    always keeps at least one item in train, so a rare class is never missing from training.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    splits = ["train"] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, value in enumerate(labels) if value == label]
        n = len(members)
        n_test = math.floor(n * test_fraction + 0.5)
        n_val = math.floor(n * val_fraction + 0.5)
        # keep one item for training: take the surplus from val first, then from test
        surplus = max(0, n_test + n_val - (n - 1))
        from_val = min(n_val, surplus)
        n_val -= from_val
        n_test -= surplus - from_val
        for rank, position in enumerate(rng.permutation(n)):
            if rank < n_test:
                splits[members[position]] = "test"
            elif rank < n_test + n_val:
                splits[members[position]] = "val"
    return splits


def carve_splits(given: Sequence[str], labels: Sequence[int], val_fraction: float, test_fraction: float,
                 seed: int) -> list[str]:
    """Keep the given ``val``/``test`` splits; split the rest (``train`` or unsplit ``""``), stratified."""
    pool = [i for i, split in enumerate(given) if split in ("", "train")]
    splits = list(given)
    for index, split in zip(pool, stratified_split([labels[i] for i in pool], val_fraction, test_fraction, seed)):
        splits[index] = split
    return splits
