"""Small metric and plot files for DVC (``cache: false`` outputs of the evaluate stage).

* ``metrics.json``: nested dict with numbers only at the leaves, what ``dvc metrics show`` /
  ``dvc metrics diff`` read (nested keys show as ``a.b.c``).
* ``confusion.csv``: ``actual,predicted`` class names, one row per test image, for the
  ``dvc plots`` ``confusion`` template.
* ``history.csv``: one row per epoch, for the ``linear`` template (x: epoch).
* ``per_class.csv``: class, precision, recall, f1, support.

Every file is written with :mod:`medattn.atomic_files` (a temporary sibling renamed into
place), so a crash never leaves a half-written file where DVC (or a reader) would pick it up.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medattn.atomic_files import atomic_path, write_text_atomic
from medattn.errors import DataError

PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


# The old name of medattn.atomic_files.atomic_path, still imported by tests/unit/test_metrics.py.
atomic_output = atomic_path


def numeric_leaves(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``metrics`` keeping only numeric leaves (nested dicts kept, empty ones dropped).

    Strings, lists (the confusion matrix has its own CSV), None and NaN/inf (undefined values
    such as an AUC for a class without positives) are left out: JSON has no NaN, and DVC only
    compares numbers. Booleans are numbers here (``dvc metrics`` shows them).
    """
    kept: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            nested = numeric_leaves(value)
            if nested:
                kept[str(key)] = nested
        elif isinstance(value, bool):
            kept[str(key)] = value
        elif isinstance(value, numbers.Integral):
            kept[str(key)] = int(value)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            kept[str(key)] = float(value)
    return kept


def write_metrics_json(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write the numeric leaves of ``metrics`` (see ``numeric_leaves``) as indented JSON."""
    return write_text_atomic(path, json.dumps(numeric_leaves(metrics), indent=2) + "\n")


def write_confusion_csv(
    y_true_names: Sequence[str], y_pred_names: Sequence[str], path: str | Path
) -> Path:
    """Write ``actual,predicted`` rows (class names), one per test image."""
    if len(y_true_names) != len(y_pred_names):
        raise DataError(
            f"cannot write {path}: {len(y_true_names)} actual labels "
            f"but {len(y_pred_names)} predictions"
        )
    rows = [
        {"actual": str(a), "predicted": str(p)}
        for a, p in zip(y_true_names, y_pred_names, strict=True)
    ]
    return _write_csv(path, ("actual", "predicted"), rows)


def write_history_csv(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one row per epoch; columns are ``epoch`` then every other key in first-seen order."""
    if not history:
        raise DataError(f"cannot write {path}: the training history is empty")
    columns: list[str] = ["epoch"]
    for row in history:
        if "epoch" not in row:
            raise DataError(f"cannot write {path}: a history row has no 'epoch' key: {dict(row)!r}")
        columns.extend(key for key in row if key not in columns)
    return _write_csv(path, columns, history)


def write_per_class_csv(per_class: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``class,precision,recall,f1,support`` rows from ``metrics["per_class"]``."""
    rows = [
        {"class": name, **{k: scores[k] for k in PER_CLASS_COLUMNS[1:]}}
        for name, scores in per_class.items()
    ]
    return _write_csv(path, PER_CLASS_COLUMNS, rows)


def _write_csv(path: str | Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    buffer = io.StringIO()
    # Missing values become empty cells (e.g. val metrics absent from an epoch without validation).
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})
    return write_text_atomic(path, buffer.getvalue())


def _cell(value: Any) -> Any:
    """A CSV cell: numpy scalars as plain Python numbers, floats round-trippable, None empty."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return value
