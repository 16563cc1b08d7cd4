"""DVC stage ``evaluate``: test-split metrics, attention faithfulness and figures.

Writes ``reports/evaluate/`` (metrics.json for `dvc metrics show`, confusion.csv and
per_class.csv for `dvc plots show`, figures/) and logs them to the pipeline's MLflow run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medattn.config import load_params
from medattn.evaluation.run import run_evaluation
from medattn.registry import get_run, read_run_ref
from medattn.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="prepared dataset (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=Path("models/model"), help="model bundle (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("reports/evaluate"), help="report folder (default: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    run_ref = read_run_ref(Path("reports/train/mlflow_run.json"))
    get_run(run_ref.run_id, run_ref.tracking_uri)  # an unknown run fails here, before any report is written
    metrics = run_evaluation(params, args.model, args.data, args.out, run_ref)
    line = f"test macro-F1 {metrics['macro_f1']:.3f} (majority baseline {metrics['baseline']['macro_f1']:.3f})"
    faith = metrics.get("attention") or {}
    if faith.get("mass_inside_ratio") is not None:
        line += f", attention mass inside lesions {faith['mass_inside_model']:.3f} vs uniform {faith['mass_inside_uniform']:.3f}"
    print(line)


if __name__ == "__main__":
    run_stage(main)
