"""DVC stage ``validate``: run the data validation suite on the prepared dataset.

Reads ``validate.*`` and ``data.image_size`` from params.yaml, checks ``data/prepared`` and
writes ``reports/validation/validation.{json,md}``. Prints one summary line; on a failing
expectation or unreadable input prints ``error: <message>`` to stderr and exits 1, so
``dvc repro`` stops before training on bad data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medattn.config import load_params
from medattn.data.validation import validate_dataset
from medattn.errors import MedattnError
from medattn.stage import run_stage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Validate a prepared dataset with the Great Expectations suite and write its report.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file (default: %(default)s; uses validate.* and data.image_size)")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"),
                        help="prepared dataset folder with manifest.csv and classes.json (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("reports/validation"),
                        help="folder for validation.json and validation.md (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        report = validate_dataset(args.data, params.validate, params.data.image_size, args.out)
    except MedattnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
