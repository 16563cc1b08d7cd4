"""Real datasets in their published on-disk layouts, behind one lookup by ``data.source``.

Each loader indexes its dataset (labels, splits, ids; every layout error raised up front as a
DataError naming the file) and returns a :class:`SourceDataset` whose ``records()`` decode and
pre-process one image at a time into records of the shared data contract. The embedded
synthetic set is not here: :mod:`medattn.data.synthetic_fundus` writes it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from medattn.config import DataParams
from medattn.data.sources.common import SourceDataset, SourceEntry, stratified_split
from medattn.data.sources.idrid import load_idrid
from medattn.data.sources.imagefolder import load_imagefolder
from medattn.data.sources.jaffe import load_jaffe
from medattn.data.sources.malaria import load_malaria
from medattn.errors import ParamError

SourceLoader = Callable[[Path, DataParams], SourceDataset]

SOURCE_LOADERS: dict[str, SourceLoader] = {
    "imagefolder": load_imagefolder,
    "idrid": load_idrid,
    "jaffe": load_jaffe,
    "malaria": load_malaria,
}


def load_source(data: DataParams) -> SourceDataset:
    """Index the real dataset that ``data.source`` and ``data.root`` name."""
    loader = SOURCE_LOADERS.get(data.source)
    if loader is None:
        raise ParamError(f"params.yaml: data.source {data.source!r} has no folder loader "
                         f"(choose from {', '.join(SOURCE_LOADERS)})")
    if not data.root:
        raise ParamError(f"params.yaml: data.root is required when data.source is {data.source!r}")
    return loader(Path(data.root), data)


__all__ = [
    "SOURCE_LOADERS",
    "SourceDataset",
    "SourceEntry",
    "load_idrid",
    "load_imagefolder",
    "load_jaffe",
    "load_malaria",
    "load_source",
    "stratified_split",
]
