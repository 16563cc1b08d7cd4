"""DVC stage ``register``: put the model in the MLflow Model Registry and gate it.

The new version gets alias ``challenger``; it becomes ``champion`` when there is no champion
yet or its test macro-F1 (from ``--metrics``) is not worse than the champion's. The decision
(and why) is written to ``--out``. Path defaults come from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

import json
from pathlib import Path

from medattn.config import load_params
from medattn.registry.pipeline import register_bundle
from medattn.stage import StageParser, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = StageParser(__doc__, PROJECT_ROOT)
    parser.add_path("--model", "model", "model bundle")
    parser.add_path("--metrics", "evaluate_metrics", "the evaluate stage's metrics.json")
    parser.add_path("--run-ref", "run_ref", "the train stage's MLflow run reference")
    parser.add_path("--out", "decision", "decision file to write")
    args = parser.parse_args()
    params = load_params(args.params)
    decision = register_bundle(params, args.model, args.metrics, args.run_ref, args.out)
    print(f"{decision['model_name']} v{decision['version']}: {decision['reason']}")
    print(json.dumps({"champion": decision["champion_after"], "challenger": decision["version"]}))


if __name__ == "__main__":
    run_stage(main)
