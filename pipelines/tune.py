"""DVC stage ``tune``: the Optuna search of ``params.yaml: tune`` on the prepared train/val splits.

Reads ``tune.*`` (space, trials, workers, storage), ``model.*``, ``train.*`` and ``mlflow.*``;
writes ``--out`` (best_params.yaml, best.json, trials.csv, candidates.yaml,
figures/) and logs one MLflow parent run with a nested run per trial. The study lives in
``--checkpoints`` (a journal file) or ``tune.storage``, outside DVC's outputs: a killed search
resumes where it stopped when re-run. Path defaults come from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medattn.config import load_params
from medattn.stage import pipeline_paths, run_stage
from medattn.tuning.search import SearchRequest, run_search
from medattn.tuning.space import dvc_exp_run_command

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    paths = pipeline_paths(PROJECT_ROOT)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=paths["prepared"],
                        help="prepared dataset (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--out", type=Path, default=paths["tune_reports"],
                        help="report folder to write (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--checkpoints", type=Path, default=paths["tune_checkpoints"],
                        help="folder of the default journal storage (default, from dvc.yaml: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    outcome = run_search(SearchRequest(params, args.params, args.data, args.out, args.checkpoints))
    summary = outcome.summary or {}
    print(f"study {outcome.ref.name}: best trial {summary.get('best_trial')} "
          f"val macro-F1 {summary.get('best_val_macro_f1', float('nan')):.3f} -> {args.out / 'best_params.yaml'}")
    print(f"train with it: {dvc_exp_run_command(summary.get('params', {}))}")


if __name__ == "__main__":
    run_stage(main)
