"""DVC stage ``evaluate``: test-split metrics, attention faithfulness and figures.

Writes the ``--out`` folder (metrics.json for `dvc metrics show`, confusion.csv and
per_class.csv for `dvc plots show`, figures/) and logs them to the pipeline's MLflow run (the
one ``--run-ref`` names). Path defaults come from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

from pathlib import Path

from medattn.config import load_params
from medattn.evaluation.run import run_evaluation
from medattn.registry import get_run, read_run_ref
from medattn.stage import StageParser, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = StageParser(__doc__, PROJECT_ROOT)
    parser.add_path("--data", "prepared", "prepared dataset")
    parser.add_path("--model", "model", "model bundle")
    parser.add_path("--run-ref", "run_ref", "the train stage's MLflow run reference")
    parser.add_path("--out", "evaluate_reports", "report folder to write")
    args = parser.parse_args()
    params = load_params(args.params)
    run_ref = read_run_ref(args.run_ref)
    get_run(run_ref.run_id, run_ref.tracking_uri)  # an unknown run fails here, before any report is written
    metrics = run_evaluation(params, args.model, args.data, args.out, run_ref)
    line = f"test macro-F1 {metrics['macro_f1']:.3f} (majority baseline {metrics['baseline']['macro_f1']:.3f})"
    faith = metrics.get("attention") or {}
    if faith.get("mass_inside_ratio") is not None:
        line += f", attention mass inside lesions {faith['mass_inside_model']:.3f} vs uniform {faith['mass_inside_uniform']:.3f}"
    print(line)


if __name__ == "__main__":
    run_stage(main)
