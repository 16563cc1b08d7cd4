"""The ``prepare`` step: turn ``data.source`` into a prepared dataset folder (the data contract).

``synthetic`` is generated from the embedded retina photograph (its ``benchmark`` preset goes
through the same right-eye flip as IDRiD, :func:`medattn.data.preprocess.orient_left`, masks
included); every other source is read
from ``data.root`` in its published layout (:mod:`medattn.data.sources`). Either way the
folder is built next to ``out_dir`` and renamed into place only when complete, so a failure
(a bad label file, a corrupt image halfway through) leaves no ``out_dir`` behind, or leaves
the previous good one untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medattn.config import Params
from medattn.data.manifest import write_prepared_dataset
from medattn.data.sources import load_source
from medattn.errors import ParamError

log = logging.getLogger(__name__)


def prepare_dataset(params: Params, out_dir: Path, progress: bool = True) -> Path:
    """Write the prepared dataset for ``params.data`` to ``out_dir`` atomically; return ``out_dir``."""
    data = params.data
    out_dir = Path(out_dir)
    if data.source == "synthetic":
        # late import: generating needs scikit-image's sample data, reading real folders does not
        from medattn.data.synthetic_fundus import generate_synthetic_fundus

        generate_synthetic_fundus(out_dir, data.synthetic, data.image_size, progress=progress)
        return out_dir
    if data.root and out_dir.resolve().is_relative_to(Path(data.root).resolve()):
        # the next run would index the prepared images as part of the raw dataset
        raise ParamError(f"params.yaml: the prepared dataset {out_dir} must not lie inside data.root {data.root}")
    source = load_source(data)  # layout errors surface here, before anything is written
    log.info("%s: %d images in %d classes from %s", source.name, len(source), len(source.class_names), source.root)
    write_prepared_dataset(out_dir, source.records(progress), source.class_names, data.source, data.image_size)
    return out_dir
