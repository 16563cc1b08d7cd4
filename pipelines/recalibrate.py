"""DVC stage ``recalibrate``: fine-tune the champion with the exported feedback snapshot (seed 002).

Reads ``recalibrate.*`` and ``mlflow.*``; trains through ``fit`` from the champion's weights on the
champion's split, registers the challenger with its figures and gate decision, writes ``--out``.
Export first: ``medattn feedback export --out data/feedback``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from medattn.config import load_params
from medattn.feedback.recalibration import recalibrate
from medattn.feedback.store import FeedbackStore
from medattn.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: %(default)s)")
    add("--snapshot", type=Path, default=Path("data/feedback"), help="feedback export (default: %(default)s)")
    add("--data", type=Path, default=Path("data/prepared"), help="prepared dataset (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("reports/recalibrate/result.json"),
                        help="result file to write (default: %(default)s)")
    parser.add_argument("--feedback-db", default=os.environ.get("MEDATTN_FEEDBACK_DB", "sqlite:///.medattn/feedback.db"),
                        help="feedback store URL (default: $MEDATTN_FEEDBACK_DB or %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    with FeedbackStore(args.feedback_db) as store:
        result = recalibrate(params, args.snapshot, args.data, store, actor="dvc", out_path=args.out)
    print(f"{result.model_name} v{result.version} (from v{result.parent_version}): {result.reason}")


if __name__ == "__main__":
    run_stage(main)
