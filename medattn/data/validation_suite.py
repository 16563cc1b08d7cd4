"""The Great Expectations (1.x) suite run on the per-image and per-split statistics tables.

Each check is one column expectation plus a sentence for a failing row, so the report says
``img_0003 is 50x50 (expected 96x96)`` instead of a bare value. Both tables are validated in one
ephemeral (in-memory) context through the 1.x fluent API: pandas data source -> dataframe asset
-> batch definition -> ExpectationSuite -> ValidationDefinition. This module imports Great
Expectations (slow, ~2 s), so :mod:`medattn.data.validation` imports it only when validating.
"""

from __future__ import annotations

import os

# before the import: no usage analytics from a pipeline stage (this GX build reads the variable)
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from medattn.config import ValidateParams
from medattn.data.manifest import SPLITS
from medattn.data.validation_report import ExpectationOutcome

GX_VERSION: str = gx.__version__
# the images table names a row by its position (unique even when ids are not) and by its id
IMAGE_KEY_COLUMNS = ["row", "id"]
IMAGE_REPORT_COLUMNS = ("id", "split", "path", "mask_path", "manifest_line")
SPLIT_KEY_COLUMNS = ["split"]

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Check:
    """One expectation of the suite and how to describe a row that fails it."""

    name: str
    expectation: gxe.Expectation
    describe_row: Callable[[Row], str]


@dataclass(frozen=True)
class CheckedTable:
    """A statistics table and the checks run on it."""

    name: str
    frame: pd.DataFrame
    key_columns: list[str]  # Great Expectations returns these for each failing row; the first finds it back
    report_columns: tuple[str, ...]
    checks: list[Check]


def image_checks(image_size: int, expected_channels: int, class_names: Sequence[str]) -> list[Check]:
    """Row-level expectations on the per-image table (see validation_stats.compute_image_stats)."""
    size = f"{image_size}x{image_size}"
    n_classes = len(class_names)
    return [
        Check("image_readable",
              gxe.ExpectColumnValuesToBeInSet(column="image_readable", value_set=[True],
                                              description="the image file exists and decodes completely"),
              lambda r: f"{r['id']} ({r['path']}: {r['image_error']})"),
        Check("image_size",
              gxe.ExpectColumnValuesToBeInSet(column="size", value_set=[size],
                                              description=f"width == height == image_size ({size})"),
              lambda r: f"{r['id']} is {r['size']} (expected {size})"),
        Check("image_channels",
              gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[expected_channels],
                                              description=f"images have {expected_channels} channel(s)"),
              lambda r: f"{r['id']} has {r['channels']} channel(s), mode {r['mode']}"),
        Check("image_not_blank",
              gxe.ExpectColumnValuesToBeBetween(column="intensity_std", min_value=0, strict_min=True,
                                                description="images are not one constant colour"),
              lambda r: f"{r['id']} is a constant image (mean intensity {r['mean_intensity']})"),
        Check("file_unchanged",
              gxe.ExpectColumnPairValuesToBeEqual(column_A="sha256", column_B="sha256_actual",
                                                  ignore_row_if="either_value_is_missing",
                                                  description="the image's sha256 still matches the manifest "
                                                              "(not changed after prepare)"),
              lambda r: f"{r['id']} ({r['path']}) changed since prepare"),
        Check("label_declared",
              gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(n_classes)),
                                              description=f"label is a declared class 0..{n_classes - 1} "
                                                          "(classes.json)"),
              lambda r: f"{r['id']} label {r['label']} (declared 0..{n_classes - 1})"),
        Check("label_name_consistent",
              gxe.ExpectColumnPairValuesToBeEqual(column_A="label_name", column_B="expected_label_name",
                                                  ignore_row_if="either_value_is_missing",
                                                  description="label_name == class_names[label]"),
              lambda r: f"{r['id']} label_name {r['label_name']!r} != {r['expected_label_name']!r}"),
        Check("split_known",
              gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                              description=f"split is one of {', '.join(SPLITS)}"),
              lambda r: f"{r['id']} split {r['split']!r}"),
        Check("id_unique",
              gxe.ExpectColumnValuesToBeUnique(column="id", description="image ids are unique"),
              lambda r: f"{r['id']} (repeated, manifest line {r['manifest_line']})"),
        Check("leakage",
              gxe.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False],
                                              description="no identical image (sha256) in two different splits"),
              lambda r: str(r["duplicate_of"])),
        Check("mask_readable",
              gxe.ExpectColumnValuesToBeInSet(column="mask_readable", value_set=[True],
                                              description="a declared mask exists and decodes"),
              lambda r: f"{r['id']} ({r['mask_path']}: {r['mask_error']})"),
        Check("mask_size",
              gxe.ExpectColumnValuesToBeInSet(column="mask_matches_image", value_set=[True],
                                              description="a mask has its image's size"),
              lambda r: f"{r['id']} mask is {r['mask_size']}, image {r['size']}"),
        Check("mask_binary",
              gxe.ExpectColumnValuesToBeInSet(column="mask_is_binary", value_set=[True],
                                              description="a mask is mode L with values 0 and 255 only"),
              lambda r: f"{r['id']} mask mode {r['mask_mode']} values {r['mask_values']}"),
    ]


def split_checks(min_class_ratio: float) -> list[Check]:
    """Per-split expectations on the class balance table (see validation_stats.class_balance_table)."""
    return [
        Check("split_not_empty",
              gxe.ExpectColumnValuesToBeBetween(column="n_images", min_value=1,
                                                description=f"each of {', '.join(SPLITS)} has images"),
              lambda r: f"{r['split']} has no images"),
        Check("class_balance",
              gxe.ExpectColumnValuesToBeBetween(column="class_ratio", min_value=min_class_ratio,
                                                description=f"per split, rarest / largest class >= {min_class_ratio}"),
              lambda r: (f"{r['split']}: {r['rarest_class']} {r['rarest_count']} vs {r['largest_class']} "
                         f"{r['largest_count']} (ratio {r['class_ratio']:.2f} < {min_class_ratio})")),
    ]


def run_suite(images: pd.DataFrame, splits: pd.DataFrame, params: ValidateParams, image_size: int,
              class_names: Sequence[str]) -> list[ExpectationOutcome]:
    """Validate both tables; one outcome per expectation, in the order the checks are listed."""
    tables = [
        CheckedTable("images", images, IMAGE_KEY_COLUMNS, IMAGE_REPORT_COLUMNS,
                     image_checks(image_size, params.expected_channels, class_names)),
        CheckedTable("splits", splits, SPLIT_KEY_COLUMNS, ("split",), split_checks(params.min_class_ratio)),
    ]
    context = gx.get_context(mode="ephemeral")
    # the validator draws a tqdm bar per batch of metrics unless the context turns them off
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("medattn_validation")
    outcomes: list[ExpectationOutcome] = []
    for table in tables:
        outcomes += _run_table(context, source, table)
    return outcomes


def _run_table(context: Any, source: Any, table: CheckedTable) -> list[ExpectationOutcome]:
    batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe(f"{table.name}_all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"medattn_{table.name}"))
    checks = {check.name: check for check in table.checks}
    for check in table.checks:
        # meta carries the check name back: results do not come back in the order added
        check.expectation.meta = {"check": check.name}
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"validate_{table.name}", data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": table.frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": table.key_columns},
    )
    rows_by_key = {record[table.key_columns[0]]: record for record in table.frame.to_dict("records")}
    by_check = {r.expectation_config.meta["check"]: r for r in result.results}
    return [_outcome(checks[name], table, by_check[name], rows_by_key) for name in checks]


def _outcome(check: Check, table: CheckedTable, result: Any, rows_by_key: dict[Any, Row]) -> ExpectationOutcome:
    details = result.result or {}
    failing_rows = []
    for index_entry in details.get("unexpected_index_list") or []:
        row = rows_by_key[_plain(index_entry[table.key_columns[0]])]
        entry = {column: _plain(row[column]) for column in table.report_columns}
        entry["detail"] = check.describe_row(row)
        failing_rows.append(entry)
    config = result.expectation_config
    error = _exception_message(result.exception_info)
    return ExpectationOutcome(
        check=check.name,
        table=table.name,
        expectation_type=config.type,
        description=config.description or "",
        kwargs={k: _plain(v) for k, v in config.kwargs.items() if k != "batch_id"},
        success=bool(result.success) and error is None,
        element_count=int(details.get("element_count") or 0),
        unexpected_count=int(details.get("unexpected_count") or 0),
        failing_rows=failing_rows,
        error=error,
    )


def _exception_message(info: Mapping[str, Any] | None) -> str | None:
    """The first exception GX caught while evaluating; info is flat or keyed by metric."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, Mapping)]
    for entry in entries:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message") or "unknown error").splitlines()[0]
    return None


def _plain(value: Any) -> Any:
    """numpy scalar -> Python scalar, so keys match and the JSON report stays plain."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
