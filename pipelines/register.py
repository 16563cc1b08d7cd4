"""DVC stage ``register``: put the model in the MLflow Model Registry and gate it.

The new version gets alias ``challenger``; it becomes ``champion`` when there is no champion
yet or its test macro-F1 (from ``--metrics``) is not worse than the champion's. The decision
(and why) is written to ``--out``. Path defaults come from dvc.yaml's ``vars: paths``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medattn.config import load_params
from medattn.registry.pipeline import register_bundle
from medattn.stage import pipeline_paths, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    paths = pipeline_paths(PROJECT_ROOT)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=paths["model"],
                        help="model bundle (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--metrics", type=Path, default=paths["evaluate_metrics"],
                        help="the evaluate stage's metrics.json (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--run-ref", type=Path, default=paths["run_ref"],
                        help="the train stage's MLflow run reference (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--out", type=Path, default=paths["decision"],
                        help="decision file to write (default, from dvc.yaml: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    decision = register_bundle(params, args.model, args.metrics, args.run_ref, args.out)
    print(f"{decision['model_name']} v{decision['version']}: {decision['reason']}")
    print(json.dumps({"champion": decision["champion_after"], "challenger": decision["version"]}))


if __name__ == "__main__":
    run_stage(main)
