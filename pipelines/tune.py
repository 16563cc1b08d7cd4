"""DVC stage ``tune``: the Optuna search of ``params.yaml: tune`` on the prepared train/val splits.

Reads ``tune.*`` (space, trials, workers, storage), ``model.*``, ``train.*`` and ``mlflow.*``;
writes ``--out`` (best_params.yaml, best.json, trials.csv, candidates.yaml,
figures/) and logs one MLflow parent run with a nested run per trial. The study lives in
``--checkpoints`` (a journal file) or ``tune.storage``, outside DVC's outputs: a killed search
resumes where it stopped when re-run. Path defaults come from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

from pathlib import Path

from medattn.config import load_params
from medattn.stage import StageParser, run_stage
from medattn.tuning.search import SearchRequest, run_search
from medattn.tuning.space import dvc_exp_run_command

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = StageParser(__doc__, PROJECT_ROOT)
    parser.add_path("--data", "prepared", "prepared dataset")
    parser.add_path("--out", "tune_reports", "report folder to write")
    parser.add_path("--checkpoints", "tune_checkpoints", "folder of the default journal storage")
    args = parser.parse_args()
    params = load_params(args.params)
    outcome = run_search(SearchRequest(params, args.params, args.data, args.out, args.checkpoints))
    summary = outcome.summary or {}
    print(f"study {outcome.ref.name}: best trial {summary.get('best_trial')} "
          f"val macro-F1 {summary.get('best_val_macro_f1', float('nan')):.3f} -> {args.out / 'best_params.yaml'}")
    print(f"train with it: {dvc_exp_run_command(summary.get('params', {}))}")


if __name__ == "__main__":
    run_stage(main)
