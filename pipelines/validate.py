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
from medattn.stage import StageParser, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = StageParser(__doc__, PROJECT_ROOT, params_help="parameters file; uses validate.* and data.image_size")
    parser.add_path("--data", "prepared", "prepared dataset folder with manifest.csv and classes.json")
    parser.add_path("--out", "validation", "folder for validation.json and validation.md")
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
