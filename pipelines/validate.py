"""DVC stage ``validate``: run the data validation suite on the prepared dataset.

Reads ``validate.*`` and ``data.image_size`` from params.yaml, checks the ``--data`` folder and
writes ``validation.{json,md}`` into ``--out``. Prints one summary line; on a failing
expectation or unreadable input prints ``error: <message>`` to stderr and exits 1, so
``dvc repro`` stops before training on bad data. Path defaults come from dvc.yaml's
``vars: paths``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medattn.config import load_params
from medattn.data.validation import validate_dataset
from medattn.stage import pipeline_paths, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    paths = pipeline_paths(PROJECT_ROOT)
    parser = argparse.ArgumentParser(
        description="Validate a prepared dataset with the Great Expectations suite and write its report.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file (default: %(default)s; uses validate.* and data.image_size)")
    parser.add_argument("--data", type=Path, default=paths["prepared"],
                        help="prepared dataset folder with manifest.csv and classes.json (default, from dvc.yaml: %(default)s)")
    parser.add_argument("--out", type=Path, default=paths["validation"],
                        help="folder for validation.json and validation.md (default, from dvc.yaml: %(default)s)")
    return parser.parse_args(argv)


def _validate(argv: list[str] | None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    report = validate_dataset(args.data, params.validate, params.data.image_size, args.out)
    print(report.summary())


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns its exit status (callable in-process, as the data tests do)."""
    try:
        run_stage(lambda: _validate(argv))
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            raise
        return int(exc.code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
