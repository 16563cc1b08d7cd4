"""DVC stage ``prepare``: build the prepared dataset folder from ``data.*`` in params.yaml.

Synthetic (default): generated deterministically from the CC0 retina photograph inside
scikit-image. Real data: ``data.source`` + ``data.root`` (imagefolder, idrid, jaffe, malaria).
Writes the ``--out`` folder (images, masks, manifest.csv, classes.json) atomically. Path
defaults come from dvc.yaml's ``vars: paths``, the one place they are written.
"""

from __future__ import annotations

from pathlib import Path

from medattn.config import load_params
from medattn.data.manifest import read_manifest
from medattn.data.prepare import prepare_dataset
from medattn.stage import StageParser, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = StageParser(__doc__, PROJECT_ROOT)
    parser.add_path("--out", "prepared", "prepared dataset folder to write")
    args = parser.parse_args()
    params = load_params(args.params)
    prepare_dataset(params, args.out)
    counts = read_manifest(args.out).groupby("split").size().to_dict()
    print(f"prepared {params.data.source} dataset in {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    run_stage(main)
