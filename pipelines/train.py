"""DVC stage ``train``: Algorithm 1 (seed 001) on the prepared dataset; one MLflow run.

Reads ``model.*``, ``train.*`` and ``mlflow.*``; writes the model bundle (``--model``) and the
``--reports`` folder (metrics.json, history.csv, figures/, mlflow_run.json). A killed run
resumes from ``--checkpoints`` when re-run with the same params and data. Path defaults come
from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medattn.config import load_params
from medattn.stage import pipeline_paths, run_stage
from medattn.training.run import TrainOutputs, run_training

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    paths = pipeline_paths(PROJECT_ROOT)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=paths["prepared"],
                        help="prepared dataset (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--validation", type=Path, default=paths["validation"],
                        help="validate stage's report, logged with the run (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--model", type=Path, default=paths["model"],
                        help="model bundle folder to write (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--reports", type=Path, default=paths["train_reports"],
                        help="report folder to write (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--checkpoints", type=Path, default=paths["checkpoints"],
                        help="resume state of an interrupted run (default, from dvc.yaml: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    outputs = TrainOutputs(args.model, args.reports, args.checkpoints, validation_report_dir=args.validation)
    result = run_training(params, args.data, outputs)
    print(f"trained {result.spec.backbone}+{result.spec.attention}: best epoch {result.best_epoch}, "
          f"val macro-F1 {result.best_row['val_macro_f1']:.3f} -> {outputs.bundle_dir}")


if __name__ == "__main__":
    run_stage(main)
