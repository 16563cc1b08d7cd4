"""DVC stage ``evaluate``: test-split metrics, attention faithfulness and figures.

Writes the ``--out`` folder (metrics.json for `dvc metrics show`, confusion.csv and
per_class.csv for `dvc plots show`, figures/) and logs them to the pipeline's MLflow run (the
one ``--run-ref`` names). Path defaults come from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medattn.config import load_params
from medattn.evaluation.run import run_evaluation
from medattn.registry import get_run, read_run_ref
from medattn.stage import pipeline_paths, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    paths = pipeline_paths(PROJECT_ROOT)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=paths["prepared"],
                        help="prepared dataset (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--model", type=Path, default=paths["model"],
                        help="model bundle (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--run-ref", type=Path, default=paths["run_ref"],
                        help="the train stage's MLflow run reference (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--out", type=Path, default=paths["evaluate_reports"],
                        help="report folder to write (default, from dvc.yaml: %(default)s)")
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
