"""DVC stage ``recalibrate``: fine-tune the champion with the exported feedback snapshot (seed 002).

Reads ``recalibrate.*`` and ``mlflow.*``; trains through ``fit`` from the champion's weights on the
champion's split, registers the challenger with its figures and gate decision, writes ``--out``.
Export first: ``medattn feedback export --out data/feedback``.
"""

from __future__ import annotations

import os
from pathlib import Path

from medattn.config import load_params
from medattn.feedback.recalibration import recalibrate
from medattn.feedback.scheduler import LockHeld, run_if_needed
from medattn.feedback.store import FeedbackStore
from medattn.stage import StageParser, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = StageParser(__doc__, PROJECT_ROOT)
    parser.add_path("--snapshot", "feedback_snapshot", "feedback export (medattn feedback export --out ...)")
    parser.add_path("--data", "prepared", "the champion's prepared dataset (its split is kept)")
    parser.add_path("--out", "recalibrate_result", "result file to write")
    state_dir = Path(os.environ.get("MEDATTN_STATE_DIR", ".medattn"))
    parser.add_argument("--feedback-db", default=os.environ.get("MEDATTN_FEEDBACK_DB", f"sqlite:///{state_dir}/feedback.db"),
                        help="feedback store URL (default: $MEDATTN_FEEDBACK_DB or %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=state_dir,
                        help="scheduler state and the retrain lock (default: $MEDATTN_STATE_DIR or %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    with FeedbackStore(args.feedback_db) as store:
        # Under the scheduler's retrain lock and recorded in its state, like `medattn recalibrate`:
        # a DVC run never trains beside a scheduled one (LockHeld is a one-line error).
        results = []

        def job():
            results.append(recalibrate(params, args.snapshot, args.data, store, actor="dvc", out_path=args.out))
            return results[-1]

        ran, why = run_if_needed(params, store, args.state_dir, job, force=True)
    if not ran:
        raise LockHeld(why)
    result = results[-1]
    print(f"{result.model_name} v{result.version} (from v{result.parent_version}): {result.reason}")


if __name__ == "__main__":
    run_stage(main)
