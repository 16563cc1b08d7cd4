"""Generic class-per-folder datasets (the torchvision "ImageFolder" layout).

Two layouts are recognised::

    root/<class>/<image>            no split given: split here, stratified by data.val_fraction,
                                    data.test_fraction and data.split_seed
    root/train/<class>/<image>      split given by the folders; a missing val/ (or test/) is
    root/val/<class>/<image>        carved from train/, stratified, with the same fractions
    root/test/<class>/<image>

A top-level folder named ``train`` selects the second layout. Class names are the sorted class
folder names (the union over splits); the label is the index in that list. Images are
``.png .jpg .jpeg .tif .tiff .bmp`` (any case); other files are ignored. Every image is
converted to RGB and area-resized to ``data.image_size`` squared.
"""

from __future__ import annotations

from pathlib import Path

from medattn.config import DataParams
from medattn.data.sources.common import (
    IMAGE_EXTENSIONS,
    SourceDataset,
    carve_splits,
    list_images,
    require_dir,
    resize_transform,
    safe_id,
    source_entry,
    subfolders,
    unique_ids,
)
from medattn.errors import DataError

SPLIT_FOLDERS: tuple[str, ...] = ("train", "val", "test")


def load_imagefolder(root: Path, data: DataParams) -> SourceDataset:
    """Index an ImageFolder dataset at ``root``; raises DataError for a missing or empty layout."""
    require_dir(root, "image folder dataset")
    if (root / "train").is_dir():
        found = _index_split_layout(root)
    else:
        found = [(path, class_name, "") for class_name, paths in _class_images(root).items() for path in paths]
    class_names = sorted({class_name for _, class_name, _ in found})
    if len(class_names) < 2:
        raise DataError(f"{root}: needs at least 2 class folders with images, found {class_names or 'none'}")
    labels = [class_names.index(class_name) for _, class_name, _ in found]
    # keep the given splits; carve a missing val/test share out of the unsplit or train/ items
    given = [split for _, _, split in found]
    splits = carve_splits(given, labels, 0.0 if "val" in given else data.val_fraction,
                          0.0 if "test" in given else data.test_fraction, data.split_seed)
    ids = unique_ids([safe_id(path.relative_to(root).with_suffix("").as_posix()) for path, _, _ in found])
    entries = [
        source_entry(i, path, label, split, root)
        for i, (path, _, _), label, split in zip(ids, found, labels, splits)
    ]
    return SourceDataset("imagefolder", root, class_names, entries, resize_transform(data.image_size))


def _class_images(folder: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for the class sub-folders of ``folder``."""
    classes = {sub.name: list_images(sub) for sub in subfolders(folder)}
    for name, paths in classes.items():
        if not paths:
            raise DataError(f"{folder / name}: class folder holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    return classes


def _index_split_layout(root: Path) -> list[tuple[Path, str, str]]:
    """(path, class, split) for ``root/{train,val,test}/<class>/<image>``."""
    unexpected = [sub.name for sub in subfolders(root) if sub.name not in SPLIT_FOLDERS]
    if unexpected:
        raise DataError(f"{root / unexpected[0]}: unexpected folder next to train/ (only train, val, test are allowed)")
    found: list[tuple[Path, str, str]] = []
    for split in SPLIT_FOLDERS:
        if (root / split).is_dir():
            for class_name, paths in _class_images(root / split).items():
                found.extend((path, class_name, split) for path in paths)
    return found

