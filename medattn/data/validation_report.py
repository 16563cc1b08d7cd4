"""What a validation run found, and its two files: ``validation.json`` (for machines: every
expectation, its result and the failing rows' ids and paths) and ``validation.md`` (for people).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPORT_JSON = "validation.json"
REPORT_MARKDOWN = "validation.md"
# failing rows named per expectation: in the one-line error, and in the markdown report
MESSAGE_ROWS = 3
MARKDOWN_ROWS = 50


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation of the suite, with its failing rows put into words."""

    check: str  # short name used in messages: "leakage", "image_size", ...
    table: str  # "images" (one row per image) or "splits" (one row per split)
    expectation_type: str
    description: str
    kwargs: dict[str, Any]
    success: bool
    element_count: int
    unexpected_count: int
    # each: the row's identifying columns (id, split, path, manifest_line / split) + "detail"
    failing_rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # set when Great Expectations could not evaluate the expectation

    def row_details(self) -> list[str]:
        """Distinct row descriptions, in row order (rows of one leaking group share one)."""
        return list(dict.fromkeys(str(row["detail"]) for row in self.failing_rows))


@dataclass(frozen=True)
class ValidationReport:
    dataset_dir: str
    image_size: int
    expected_channels: int
    min_class_ratio: float
    class_names: list[str]
    n_images: int
    splits: list[dict[str, Any]]  # the class balance table: counts per split and class
    image_summary: dict[str, Any]
    outcomes: list[ExpectationOutcome]
    great_expectations_version: str
    json_path: Path
    markdown_path: Path

    @property
    def success(self) -> bool:
        return all(outcome.success for outcome in self.outcomes)

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.success]

    def summary(self) -> str:
        """One line for the stage's stdout."""
        counts = ", ".join(f"{s['split']} {s['n_images']}" for s in self.splits)
        passed = len(self.outcomes) - len(self.failed)
        verdict = "passed" if self.success else "FAILED"
        return (f"validation {verdict}: {passed}/{len(self.outcomes)} expectations on {self.n_images} images "
                f"({counts}); report {self.markdown_path}")

    def failure_message(self) -> str:
        """The one-line ValidationFailed message: each failing expectation and its first rows."""
        parts = []
        for outcome in self.failed:
            if outcome.error:
                parts.append(f"{outcome.check}: could not be evaluated ({outcome.error})")
                continue
            details = outcome.row_details()
            shown = ", ".join(details[:MESSAGE_ROWS]) or f"{outcome.unexpected_count} unexpected value(s)"
            more = f" (+{len(details) - MESSAGE_ROWS} more)" if len(details) > MESSAGE_ROWS else ""
            parts.append(f"{outcome.check}: {shown}{more}")
        n = len(self.failed)
        noun = "expectation" if n == 1 else "expectations"
        return f"validation failed: {n} {noun} — {'; '.join(parts)}; see {self.markdown_path}"

    def to_dict(self) -> dict[str, Any]:
        passed = len(self.outcomes) - len(self.failed)
        return {
            "success": self.success,
            "dataset_dir": self.dataset_dir,
            "n_images": self.n_images,
            "image_size": self.image_size,
            "expected_channels": self.expected_channels,
            "min_class_ratio": self.min_class_ratio,
            "class_names": self.class_names,
            "great_expectations_version": self.great_expectations_version,
            "statistics": {"evaluated": len(self.outcomes), "successful": passed,
                           "unsuccessful": len(self.outcomes) - passed},
            "splits": self.splits,
            "image_summary": self.image_summary,
            "expectations": [asdict(outcome) for outcome in self.outcomes],
        }


def write_report(report: ValidationReport) -> None:
    """Write both report files, each atomically (temp file in the same folder, then rename)."""
    _write_atomic(report.json_path, json.dumps(report.to_dict(), indent=2, default=_json_value) + "\n")
    _write_atomic(report.markdown_path, render_markdown(report))


def remove_stale_report(report_dir: Path) -> None:
    """Delete an earlier run's files, so a run that stops early cannot leave a "passed" report."""
    for name in (REPORT_JSON, REPORT_MARKDOWN):
        (report_dir / name).unlink(missing_ok=True)


def render_markdown(report: ValidationReport) -> str:
    status = "passed" if report.success else f"**FAILED** ({len(report.failed)} of {len(report.outcomes)} expectations)"
    lines = [
        f"# Data validation: {status}",
        "",
        f"Dataset `{report.dataset_dir}`: {report.n_images} images, classes {', '.join(report.class_names)}; "
        f"expected {report.image_size}x{report.image_size} px, {report.expected_channels} channel(s), "
        f"class ratio >= {report.min_class_ratio} per split (Great Expectations {report.great_expectations_version}).",
        "",
        "## Splits",
        "",
        "| split | images | " + " | ".join(report.class_names) + " | rarest / largest |",
        "|---|---:|" + "---:|" * len(report.class_names) + "---:|",
    ]
    for split in report.splits:
        ratio = "n/a" if split["class_ratio"] is None else f"{split['class_ratio']:.2f}"
        counts = " | ".join(str(split["class_counts"][name]) for name in report.class_names)
        lines.append(f"| {split['split']} | {split['n_images']} | {counts} | {ratio} |")
    lines += ["", "## Expectations", "", "| | check | expectation | failing rows |", "|---|---|---|---:|"]
    for outcome in report.outcomes:
        mark = "pass" if outcome.success else "**FAIL**"
        lines.append(f"| {mark} | `{outcome.check}` | {outcome.description} | {outcome.unexpected_count} |")
    for outcome in report.failed:
        lines += ["", f"## Failed: `{outcome.check}`", "", outcome.description + f" (`{outcome.expectation_type}`)", ""]
        if outcome.error:
            lines.append(f"Could not be evaluated: {outcome.error}")
            continue
        for row in outcome.failing_rows[:MARKDOWN_ROWS]:
            where = f" — `{row['path']}` (manifest line {row['manifest_line']})" if "path" in row else ""
            lines.append(f"- {row['detail']}{where}")
        if len(outcome.failing_rows) > MARKDOWN_ROWS:
            lines.append(f"- ... and {len(outcome.failing_rows) - MARKDOWN_ROWS} more (see {REPORT_JSON})")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _json_value(value: Any) -> Any:
    """numpy scalars, Paths and sets that Great Expectations results carry, as JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str)
    return str(value)
