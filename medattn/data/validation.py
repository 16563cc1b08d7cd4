"""The data validation stage: check a prepared dataset before anything trains on it.

``validate_dataset`` reads the manifest, measures every image and mask
(:mod:`medattn.data.validation_stats`), runs the Great Expectations suite on those tables
(:mod:`medattn.data.validation_suite`), writes ``validation.json`` + ``validation.md``
(:mod:`medattn.data.validation_report`) and raises :class:`ValidationFailed` naming the failing
expectations and rows when anything is wrong. The report is written first, so the stage always
leaves an explanation behind.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medattn.config import ValidateParams
from medattn.data.manifest import read_class_names, read_manifest
from medattn.data.validation_report import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    ExpectationOutcome,
    ValidationReport,
    remove_stale_report,
    write_report,
)
from medattn.data.validation_stats import class_balance_table, compute_image_stats
from medattn.errors import DataError, ValidationFailed

__all__ = ["ExpectationOutcome", "ValidationReport", "validate_dataset"]


def validate_dataset(dataset_dir: str | Path, params: ValidateParams, image_size: int,
                     report_dir: str | Path) -> ValidationReport:
    """Validate ``dataset_dir`` (the shared prepared-dataset layout) and report into ``report_dir``.

    Returns the report when every expectation holds. A manifest or classes file that cannot be
    read at all raises DataError (from :mod:`medattn.data.manifest`) before any report is written.
    """
    dataset_dir, report_dir = Path(dataset_dir), Path(report_dir)
    remove_stale_report(report_dir)
    if not dataset_dir.is_dir():
        raise DataError(f"{dataset_dir}: dataset folder not found (run the prepare stage first)")
    manifest = read_manifest(dataset_dir)
    class_names = read_class_names(dataset_dir)

    images = compute_image_stats(dataset_dir, manifest, class_names)
    splits = class_balance_table(images, class_names)
    from medattn.data import validation_suite  # late: importing Great Expectations takes seconds

    outcomes = validation_suite.run_suite(images, splits, params, image_size, class_names)
    report = ValidationReport(
        dataset_dir=str(dataset_dir),
        image_size=image_size,
        expected_channels=params.expected_channels,
        min_class_ratio=params.min_class_ratio,
        class_names=list(class_names),
        n_images=len(images),
        splits=_plain_records(splits),
        image_summary=_image_summary(images),
        outcomes=outcomes,
        great_expectations_version=validation_suite.GX_VERSION,
        json_path=report_dir / REPORT_JSON,
        markdown_path=report_dir / REPORT_MARKDOWN,
    )
    write_report(report)
    if not report.success:
        raise ValidationFailed(report.failure_message())
    return report


def _plain_records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """Rows as dicts with None, not NaN, for missing values (NaN is not valid JSON)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _image_summary(images: pd.DataFrame) -> dict[str, object]:
    """A few dataset-level numbers for the report (the per-image table itself is not kept)."""
    intensity = pd.to_numeric(images["mean_intensity"], errors="coerce").dropna()
    return {
        "readable": int(images["image_readable"].sum()),
        "with_mask": int(images["mask_declared"].sum()),
        "mean_intensity": {
            "min": round(float(intensity.min()), 3) if len(intensity) else None,
            "mean": round(float(intensity.mean()), 3) if len(intensity) else None,
            "max": round(float(intensity.max()), 3) if len(intensity) else None,
        },
    }
