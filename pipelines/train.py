"""DVC stage ``train``: Algorithm 1 (seed 001) on the prepared dataset; one MLflow run.

Reads ``model.*``, ``train.*`` and ``mlflow.*``; writes the model bundle (``--model``) and the
``--reports`` folder (metrics.json, history.csv, figures/, mlflow_run.json). A killed run
resumes from ``--checkpoints`` when re-run with the same params and data. Path defaults come
from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

from pathlib import Path

from medattn.config import load_params
from medattn.stage import StageParser, run_stage
from medattn.training.run import TrainOutputs, run_training

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = StageParser(__doc__, PROJECT_ROOT)
    parser.add_path("--data", "prepared", "prepared dataset")
    parser.add_path("--validation", "validation", "validate stage's report, logged with the run")
    parser.add_path("--model", "model", "model bundle folder to write")
    parser.add_path("--reports", "train_reports", "report folder to write")
    parser.add_path("--checkpoints", "checkpoints", "resume state of an interrupted run")
    args = parser.parse_args()
    params = load_params(args.params)
    outputs = TrainOutputs(args.model, args.reports, args.checkpoints, validation_report_dir=args.validation)
    result = run_training(params, args.data, outputs)
    print(f"trained {result.spec.backbone}+{result.spec.attention}: best epoch {result.best_epoch}, "
          f"val macro-F1 {result.best_row['val_macro_f1']:.3f} -> {outputs.bundle_dir}")


if __name__ == "__main__":
    run_stage(main)
