"""The Japanese Female Facial Expression (JAFFE) database, zenodo record 3451524 layout.

::

    root/**/KA.AN1.39.tiff       213 grey 256x256 images: <poser>.<posed expression><n>.<id>.tiff
    root/**/A_README_FIRST.txt   the semantic ratings (mean over 60 raters), as a table:
                                 N# HAP SAD SUR ANG DIS FEA PIC
                                 1  2.87 2.52 2.10 1.97 1.97 2.06 KA-NE1

The ratings are found by their header, not by a file name: every text file up to two folders
deep is scanned for a line with ``PIC`` and emotion columns, and the rows that follow it (up to
the first line that is not a rating row) form a table, so prose around the table in the README
is fine. When several tables are found, the one with the most emotion columns wins (some
versions print the ratings without ``FEA`` as well); a tie between tables is a DataError.

Following seed 001, the label is the emotion with the highest mean rating (ties go to the
earlier column); the classes are the emotion columns of the table, in its order. The row
``KA-AN1`` rates the image ``KA.AN1.<n>.tiff``; images without a rating are skipped with a
warning. Images are replicated to three channels and area-resized to ``data.image_size``
squared; the split is stratified by data.val_fraction, data.test_fraction and data.split_seed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medattn.config import DataParams
from medattn.data.sources.common import (
    IMAGE_EXTENSIONS,
    SourceDataset,
    require_dir,
    resize_transform,
    safe_id,
    source_entry,
    stratified_split,
)
from medattn.errors import DataError

log = logging.getLogger(__name__)

EMOTION_COLUMNS: dict[str, str] = {
    "HAP": "happiness",
    "SAD": "sadness",
    "SUR": "surprise",
    "ANG": "anger",
    "DIS": "disgust",
    "FEA": "fear",
}
_PICTURE = re.compile(r"^([A-Z]{2})-([A-Z]{2}\d+)$", re.IGNORECASE)  # KA-AN1
_IMAGE_NAME = re.compile(r"^([A-Z]{2})\.([A-Z]{2}\d+)\.\d+$", re.IGNORECASE)  # KA.AN1.39
_MAX_RATING_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Rating:
    picture: str  # "KA-AN1", upper case
    scores: tuple[float, ...]  # in the order of RatingTable.emotions
    line: int


@dataclass(frozen=True)
class RatingTable:
    path: Path
    emotions: tuple[str, ...]  # column codes present, in file order: ("HAP", "SAD", ...)
    ratings: tuple[Rating, ...]


def load_jaffe(root: Path, data: DataParams) -> SourceDataset:
    """Index JAFFE at ``root``; raises DataError for a missing folder, rating file or rated image."""
    require_dir(root, "JAFFE dataset")
    table = find_rating_table(root)
    images = _index_images(root)
    class_names = [EMOTION_COLUMNS[code] for code in table.emotions]
    found: list[tuple[Path, int]] = []
    for rating in table.ratings:
        path = images.pop(rating.picture, None)
        if path is None:
            poser, expression = rating.picture.split("-")
            raise DataError(f"{root}: no image {poser}.{expression}.<n>.tiff for the rating of {rating.picture} "
                            f"({table.path}:{rating.line})")
        found.append((path, int(np.argmax(rating.scores))))
    for picture, path in sorted(images.items()):
        log.warning("%s: no rating for %s in %s; image skipped", path, picture, table.path)
    found.sort(key=lambda item: item[0].name)
    splits = stratified_split([label for _, label in found], data.val_fraction, data.test_fraction, data.split_seed)
    entries = [
        source_entry(safe_id(path.stem), path, label, split, root) for (path, label), split in zip(found, splits)
    ]
    return SourceDataset("jaffe", root, class_names, entries, resize_transform(data.image_size))


def find_rating_table(root: Path) -> RatingTable:
    """The semantic rating table found in the text files under ``root`` (up to two folders deep)."""
    candidates = [p for pattern in ("*", "*/*", "*/*/*") for p in sorted(root.glob(pattern)) if _may_be_rating_file(p)]
    tables = [table for path in candidates for table in parse_rating_tables(path)]
    if not tables:
        raise DataError(f"{root}: JAFFE rating file not found "
                        "(a text file with a table headed 'N# HAP SAD SUR ANG DIS FEA PIC')")
    most = max(len(t.emotions) for t in tables)
    best = [t for t in tables if len(t.emotions) == most]
    if len(best) > 1:
        where = ", ".join(f"{t.path}:{t.ratings[0].line - 1}" for t in best[:2])
        raise DataError(f"{root}: several JAFFE rating tables with the same columns ({where}); keep one")
    return best[0]


def _may_be_rating_file(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() not in IMAGE_EXTENSIONS
        and path.stat().st_size <= _MAX_RATING_FILE_BYTES
    )


def parse_rating_tables(path: Path) -> list[RatingTable]:
    """Every rating table in a text file (none for a file without one).

    A table is a header line followed by rating rows; it ends at the first non-blank line that
    is not a rating row. A line that *looks* like a rating row (it starts with a row number or
    ends with a picture code) but does not parse is a DataError naming the file and line.
    """
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    tables: list[RatingTable] = []
    index = 0
    while index < len(lines):
        fields = _header_fields(lines[index])
        index += 1
        if fields is None:
            continue
        ratings: list[Rating] = []
        while index < len(lines):
            tokens = lines[index].split()
            if tokens and not _looks_like_rating_row(tokens):
                break
            if tokens:
                ratings.append(_parse_row(path, index + 1, tokens, fields))
            index += 1
        if ratings:
            _check_unique(path, ratings)
            emotions = tuple(f for f in fields if f in EMOTION_COLUMNS)
            tables.append(RatingTable(path, emotions, tuple(ratings)))
    return tables


def _header_fields(line: str) -> list[str] | None:
    """Column codes of a header line (without the row-number column), or None for other lines."""
    fields = [f.upper() for f in line.replace("#", " # ").split()]
    fields = [f for f in fields if f not in ("#", "N")]
    if "PIC" in fields and sum(f in EMOTION_COLUMNS for f in fields) >= 2:
        return fields
    return None


def _looks_like_rating_row(tokens: list[str]) -> bool:
    """Ends with a picture code, or starts with a row number and a rating (not a prose line)."""
    if _PICTURE.match(tokens[-1]):
        return True
    return len(tokens) >= 3 and tokens[0].isdigit() and _is_number(tokens[1])


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _parse_row(path: Path, line: int, tokens: list[str], fields: list[str]) -> Rating:
    if len(tokens) == len(fields) + 1:  # a leading row number (the "N#" column)
        tokens = tokens[1:]
    if len(tokens) != len(fields):
        raise DataError(f"{path}:{line}: expected {len(fields)} columns ({' '.join(fields)}), got {len(tokens)}")
    row = dict(zip(fields, tokens))
    picture = row["PIC"].upper()
    if not _PICTURE.match(picture):
        raise DataError(f"{path}:{line}: PIC {row['PIC']!r} is not like KA-AN1")
    try:
        scores = tuple(float(row[code]) for code in fields if code in EMOTION_COLUMNS)
    except ValueError as exc:
        raise DataError(f"{path}:{line}: a rating is not a number ({exc})") from exc
    return Rating(picture, scores, line)


def _check_unique(path: Path, ratings: list[Rating]) -> None:
    first_line: dict[str, int] = {}
    for rating in ratings:
        if rating.picture in first_line:
            raise DataError(f"{path}:{rating.line}: {rating.picture} is rated twice (first on line {first_line[rating.picture]})")
        first_line[rating.picture] = rating.line


def _index_images(root: Path) -> dict[str, Path]:
    """``{"KA-AN1": path}`` for every JAFFE-named image under ``root``."""
    images: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        match = _IMAGE_NAME.match(path.stem)
        if not (match and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")):
            continue
        picture = f"{match.group(1)}-{match.group(2)}".upper()
        if picture in images:
            raise DataError(f"{path}: a second image for {picture} (the first is {images[picture]})")
        images[picture] = path
    return images
