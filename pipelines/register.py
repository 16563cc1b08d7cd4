"""DVC stage ``register``: put the model in the MLflow Model Registry and gate it.

The new version gets alias ``challenger``; it becomes ``champion`` when there is no champion
yet or its test macro-F1 is not worse than the champion's. The decision (and why) is written
to ``reports/register/decision.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medattn.config import load_params
from medattn.registry.pipeline import register_bundle
from medattn.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=Path("models/model"), help="model bundle (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("reports/register/decision.json"), help="decision file (default: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    decision = register_bundle(params, args.model, Path("reports/evaluate/metrics.json"),
                               Path("reports/train/mlflow_run.json"), args.out)
    print(f"{decision['model_name']} v{decision['version']}: {decision['reason']}")
    print(json.dumps({"champion": decision["champion_after"], "challenger": decision["version"]}))


if __name__ == "__main__":
    run_stage(main)
