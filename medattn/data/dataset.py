"""Torch access to a prepared dataset folder (the shared data contract).

The datasets of this project are small (hundreds to a few thousand images at ~100 px), so a
split is decoded **once, fully into memory** as uint8 tensors when it is opened; each item
is then normalised on the fly with :func:`medattn.data.preprocess.normalize_tensor`, the same
function serving uses, so training and serving inputs are identical. uint8 keeps memory at a
quarter of float32 (720 images of 96x96: 20 MB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from medattn.data.manifest import SPLITS, read_class_names, read_manifest
from medattn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize_tensor, pil_to_uint8_tensor
from medattn.data.sources.common import open_image
from medattn.errors import DataError

# show a progress bar only when decoding takes long enough to wonder about
_PROGRESS_MIN_IMAGES = 2000


@dataclass(frozen=True)
class SplitTensors:
    """One or more splits of a prepared dataset, decoded into memory."""

    ids: list[str]
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    masks: torch.Tensor  # uint8 (N, 1, H, W), 1 = lesion, all 0 where there is no mask
    has_mask: torch.Tensor  # bool (N,)
    class_names: list[str]


def load_split(dataset_dir: str | Path, split: str | Sequence[str], with_masks: bool = True) -> SplitTensors:
    """Decode the rows of ``split`` (or several splits, e.g. ``("train", "val")``) in manifest order."""
    dataset_dir = Path(dataset_dir)
    splits = _as_splits(split)
    frame = read_manifest(dataset_dir)
    class_names = read_class_names(dataset_dir)
    rows = frame[frame["split"].isin(splits)].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"{dataset_dir / 'manifest.csv'}: no rows in split {'+'.join(splits)}")
    bad = rows.index[rows["label"] >= len(class_names)]
    if len(bad):
        raise DataError(f"{dataset_dir / 'manifest.csv'}: id {rows.at[bad[0], 'id']}: label {rows.at[bad[0], 'label']} "
                        f"but classes.json has {len(class_names)} classes")
    images, masks, has_mask = _decode(dataset_dir, rows, with_masks)
    return SplitTensors(
        ids=rows["id"].tolist(),
        images=images,
        labels=torch.tensor(rows["label"].to_numpy(), dtype=torch.int64),
        masks=masks,
        has_mask=has_mask,
        class_names=class_names,
    )


def load_split_tensors(dataset_dir: str | Path, split: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, H, W), labels int64 (N,))``, e.g. to build the pixel representation."""
    tensors = load_split(dataset_dir, split, with_masks=False)
    return tensors.images, tensors.labels


def class_counts(dataset_dir: str | Path, split: str | Sequence[str]) -> list[int]:
    """Images per class in ``split``, indexed by label (zeros included); reads only the manifest."""
    dataset_dir = Path(dataset_dir)
    frame = read_manifest(dataset_dir)
    n_classes = len(read_class_names(dataset_dir))
    labels = frame.loc[frame["split"].isin(_as_splits(split)), "label"].to_numpy()
    if labels.size and labels.max() >= n_classes:
        raise DataError(f"{dataset_dir / 'manifest.csv'}: label {labels.max()} but classes.json has {n_classes} classes")
    return np.bincount(labels, minlength=n_classes).tolist()


class ManifestDataset(Dataset):
    """Items ``(image float (3, H, W) normalised, label int, mask float (1, H, W) in {0, 1}, has_mask bool)``.

    The whole split is decoded into memory once, at construction (see the module docstring).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str | Sequence[str],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.mean = tuple(mean)
        self.std = tuple(std)
        tensors = load_split(self.dataset_dir, split)
        self.ids = tensors.ids
        self.images = tensors.images
        self.labels = tensors.labels
        self.masks = tensors.masks
        self.has_mask = tensors.has_mask
        self.class_names = tensors.class_names
        normalize_tensor(self.images[:1], self.mean, self.std)  # fail now, not in a worker, on a bad mean/std

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        image = normalize_tensor(self.images[index], self.mean, self.std)
        return image, int(self.labels[index]), self.masks[index].float(), bool(self.has_mask[index])

    def class_counts(self) -> list[int]:
        """Images per class, indexed by label."""
        return torch.bincount(self.labels, minlength=len(self.class_names)).tolist()


def _as_splits(split: str | Sequence[str]) -> tuple[str, ...]:
    splits = (split,) if isinstance(split, str) else tuple(split)
    unknown = [s for s in splits if s not in SPLITS]
    if not splits or unknown:
        raise DataError(f"split must be one or more of {', '.join(SPLITS)}, got {split!r}")
    return splits


def _decode(dataset_dir: Path, rows: pd.DataFrame, with_masks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images: list[torch.Tensor] = []
    masks: dict[int, torch.Tensor] = {}
    size: tuple[int, int] | None = None
    show = len(rows) >= _PROGRESS_MIN_IMAGES
    for index, row in enumerate(tqdm(rows.itertuples(index=False), total=len(rows), desc="loading images",
                                     unit="img", disable=not show)):
        path = dataset_dir / row.path
        image = open_image(path)
        if image.mode != "RGB":
            raise DataError(f"{path}: image mode is {image.mode}, the data contract requires RGB")
        size = size or image.size
        if image.size != size:
            raise DataError(f"{path}: image is {image.size[0]}x{image.size[1]}, the others are {size[0]}x{size[1]}")
        images.append(pil_to_uint8_tensor(image))
        if with_masks and row.mask_path:
            masks[index] = _decode_mask(dataset_dir / row.mask_path, size)
    stacked = torch.stack(images)
    n, _, height, width = stacked.shape
    has_mask = torch.zeros(n, dtype=torch.bool)
    if not masks:  # real sources have no masks: one shared zero plane instead of N copies
        return stacked, torch.zeros((1, 1, height, width), dtype=torch.uint8).expand(n, 1, height, width), has_mask
    all_masks = torch.zeros((n, 1, height, width), dtype=torch.uint8)
    for index, mask in masks.items():
        all_masks[index] = mask
        has_mask[index] = True
    return stacked, all_masks, has_mask


def _decode_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    mask = open_image(path)
    if mask.size != size:
        raise DataError(f"{path}: mask is {mask.size[0]}x{mask.size[1]}, its image is {size[0]}x{size[1]}")
    # contract: 0 or 255; anything above mid-grey counts as lesion so a resampled mask still works
    lesion = np.asarray(mask.convert("L")) > 127
    return torch.from_numpy(lesion.astype(np.uint8)).unsqueeze(0)
