"""NIH malaria cell images (Rajaraman et al., 2018) in their published layout.

::

    root/cell_images/Parasitized/*.png      label 1 "parasitized"
    root/cell_images/Uninfected/*.png       label 0 "uninfected"

``root`` may also be the ``cell_images`` folder itself, or the outer folder of the Kaggle copy
that nests ``cell_images/cell_images``. Only ``.png`` files count (the archive ships
``Thumbs.db`` files next to them). The set has no official split: it is split here, stratified,
by data.val_fraction, data.test_fraction and data.split_seed. Cells come in varying sizes and
are area-resized to ``data.image_size`` squared.
"""

from __future__ import annotations

from pathlib import Path

from medattn.config import DataParams
from medattn.data.sources.common import (
    SourceDataset,
    list_images,
    require_dir,
    resize_transform,
    safe_id,
    source_entry,
    stratified_split,
)
from medattn.errors import DataError

# label order: uninfected is the negative class 0, so "positive" metrics refer to parasitized
CLASS_FOLDERS: tuple[tuple[str, str], ...] = (("uninfected", "Uninfected"), ("parasitized", "Parasitized"))


def find_cell_images(root: Path) -> Path:
    """The folder that holds ``Parasitized/`` and ``Uninfected/``."""
    require_dir(root, "malaria dataset")
    folder = root
    while not all((folder / name).is_dir() for _, name in CLASS_FOLDERS) and (folder / "cell_images").is_dir():
        folder = folder / "cell_images"
    missing = [name for _, name in CLASS_FOLDERS if not (folder / name).is_dir()]
    if missing:
        raise DataError(f"{folder / missing[0]}: malaria class folder not found "
                        "(expected cell_images/Parasitized and cell_images/Uninfected)")
    return folder


def load_malaria(root: Path, data: DataParams) -> SourceDataset:
    """Index the NIH malaria set at ``root``; raises DataError for a missing or empty class folder."""
    folder = find_cell_images(root)
    class_names = [class_name for class_name, _ in CLASS_FOLDERS]
    found: list[tuple[Path, int]] = []
    for label, (_, folder_name) in enumerate(CLASS_FOLDERS):
        pngs = [p for p in list_images(folder / folder_name) if p.suffix.lower() == ".png"]
        if not pngs:
            raise DataError(f"{folder / folder_name}: holds no .png images")
        found.extend((path, label) for path in pngs)
    splits = stratified_split([label for _, label in found], data.val_fraction, data.test_fraction, data.split_seed)
    entries = [
        source_entry(f"{class_names[label]}-{safe_id(path.stem)}", path, label, split, folder)
        for (path, label), split in zip(found, splits)
    ]
    return SourceDataset("malaria", root, class_names, entries, resize_transform(data.image_size))
