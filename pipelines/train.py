"""DVC stage ``train``: Algorithm 1 (seed 001) on the prepared dataset; one MLflow run.

Reads ``model.*``, ``train.*`` and ``mlflow.*``; writes the model bundle ``models/model`` and
``reports/train/`` (metrics.json, history.csv, curves.png, mlflow_run.json). A killed run
resumes from ``checkpoints/train`` when re-run with the same params and data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medattn.config import load_params
from medattn.stage import run_stage
from medattn.training.run import TrainOutputs, run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="prepared dataset (default: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    outputs = TrainOutputs(Path("models/model"), Path("reports/train"), Path("checkpoints/train"),
                           validation_report_dir=Path("reports/validation"))
    result = run_training(params, args.data, outputs)
    print(f"trained {result.spec.backbone}+{result.spec.attention}: best epoch {result.best_epoch}, "
          f"val macro-F1 {result.best_row['val_macro_f1']:.3f} -> {outputs.bundle_dir}")


if __name__ == "__main__":
    run_stage(main)
