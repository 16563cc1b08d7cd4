"""Classification metrics against hand-computed values, and the DVC metric/plot files they feed."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medattn.errors import DataError
from medattn.evaluation.metrics import classification_metrics
from medattn.evaluation.reports import (
    atomic_output,
    numeric_leaves,
    write_confusion_csv,
    write_history_csv,
    write_metrics_json,
    write_per_class_csv,
)

NAMES = ["healthy", "mild", "severe"]


def test_perfect_classifier_scores_one_everywhere() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    one_hot = np.eye(3)[y]
    m = classification_metrics(y, y, one_hot, NAMES, majority_label=0)
    assert m["n_images"] == 6
    assert m["accuracy"] == 1.0
    assert m["macro_precision"] == m["macro_recall"] == m["macro_f1"] == 1.0
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert m["roc_auc_ovr"] == 1.0
    assert m["per_class"]["severe"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}


def test_known_confusion_matches_hand_computed_values() -> None:
    # rows actual, columns predicted: [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 2]
    m = classification_metrics(y_true, y_pred, None, NAMES, majority_label=0)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["healthy"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["healthy"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["mild"]["precision"] == pytest.approx(1 / 2)
    assert m["per_class"]["mild"]["f1"] == pytest.approx(1 / 2)
    assert m["per_class"]["healthy"]["support"] == 3
    assert m["macro_precision"] == pytest.approx(13 / 18)
    assert m["macro_recall"] == pytest.approx(13 / 18)
    assert m["macro_f1"] == pytest.approx(13 / 18)
    assert m["roc_auc_ovr"] is None
    assert m["roc_auc_per_class"] == {"healthy": None, "mild": None, "severe": None}


def test_majority_baseline_always_predicts_the_training_majority() -> None:
    y_true = [0, 0, 0, 1, 1, 2]
    m = classification_metrics(y_true, y_true, None, NAMES, majority_label=0)
    # Always "healthy": accuracy 3/6; F1 healthy = 2 * 0.5 * 1 / 1.5 = 2/3, others 0.
    assert m["baseline"]["majority_class"] == "healthy"
    assert m["baseline"]["accuracy"] == pytest.approx(0.5)
    assert m["baseline"]["macro_f1"] == pytest.approx(2 / 9)
    # The training majority need not be the test majority.
    other = classification_metrics(y_true, y_true, None, NAMES, majority_label=2)
    assert other["baseline"]["accuracy"] == pytest.approx(1 / 6)


def test_class_absent_from_test_set_is_left_out_of_macro_scores_and_auc() -> None:
    y_true = [0, 0, 1, 1]
    y_pred = [0, 1, 0, 2]  # one wrong prediction of the absent class
    y_prob = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.05, 0.9, 0.05]])
    m = classification_metrics(y_true, y_pred, y_prob, NAMES, majority_label=0)
    assert m["per_class"]["severe"]["support"] == 0
    assert m["per_class"]["severe"]["precision"] == 0.0
    # healthy: P 1/2, R 1/2; mild: predicted once (wrongly) and never found -> P 0, R 0.
    assert m["macro_recall"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["roc_auc_per_class"]["severe"] is None
    # healthy: positives 0.8, 0.3 vs negatives 0.5, 0.05 -> 3 of 4 pairs ordered; mild likewise.
    assert m["roc_auc_per_class"]["healthy"] == pytest.approx(0.75)
    assert m["roc_auc_per_class"]["mild"] == pytest.approx(0.75)
    assert m["roc_auc_ovr"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "y_prob", "majority", "needle"),
    [
        ([0, 1, 3], [0, 1, 2], None, 0, "y_true holds label 3"),
        ([0, 1], [0, 1, 2], None, 0, "2 labels but y_pred has 3"),
        ([0, 1], [0, 1], np.ones((2, 2)), 0, "y_prob must be (2, 3)"),
        ([0, 1], [0, 1], None, 5, "majority_label 5"),
        ([], [], None, 0, "empty test set"),
        ([0.5, 1], [0, 1], None, 0, "integer class indices"),
    ],
)
def test_bad_inputs_raise_data_error_naming_the_argument(
    y_true, y_pred, y_prob, majority, needle
) -> None:
    with pytest.raises(DataError) as caught:
        classification_metrics(y_true, y_pred, y_prob, NAMES, majority_label=majority)
    assert needle in str(caught.value)


def test_metrics_json_keeps_numeric_leaves_and_parses_back(tmp_path) -> None:
    m = classification_metrics(
        [0, 0, 1, 2], [0, 1, 1, 2], np.eye(3)[[0, 1, 1, 2]], NAMES, majority_label=0
    )
    m["faithfulness"] = {
        "mass_inside_model": np.float32(0.25),
        "topk_iou_ratio": None,
        "n": np.int64(3),
    }
    m["nan_value"] = float("nan")
    path = write_metrics_json(m, tmp_path / "out" / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded["accuracy"] == pytest.approx(0.75)
    assert loaded["per_class"]["mild"]["support"] == 1
    assert loaded["baseline"] == {
        "majority_label": 0,
        "accuracy": 0.5,
        "macro_f1": pytest.approx(2 / 9),
    }
    assert loaded["faithfulness"] == {"mass_inside_model": 0.25, "n": 3}
    assert "confusion_matrix" not in loaded and "nan_value" not in loaded
    assert loaded == numeric_leaves(m)
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left behind


def test_csv_reports_parse_back(tmp_path) -> None:
    confusion = write_confusion_csv(
        ["healthy", "mild"], ["mild", "mild"], tmp_path / "confusion.csv"
    )
    with confusion.open() as f:
        assert list(csv.DictReader(f)) == [
            {"actual": "healthy", "predicted": "mild"},
            {"actual": "mild", "predicted": "mild"},
        ]
    history = [
        {"epoch": 1, "train_loss": np.float32(0.5), "val_loss": 0.7},
        {"epoch": 2, "train_loss": 0.25, "val_loss": 0.5, "val_macro_f1": 0.8},
    ]
    with write_history_csv(history, tmp_path / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_macro_f1"]
    assert [float(r["train_loss"]) for r in rows] == [0.5, 0.25]
    assert rows[0]["val_macro_f1"] == "" and rows[1]["val_macro_f1"] == "0.8"
    m = classification_metrics([0, 1, 2], [0, 1, 1], None, NAMES, majority_label=0)
    with write_per_class_csv(m["per_class"], tmp_path / "per_class.csv").open() as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == NAMES
    assert float(per_class[1]["precision"]) == pytest.approx(0.5)
    assert per_class[2]["support"] == "1"


def test_report_writers_reject_inconsistent_input(tmp_path) -> None:
    with pytest.raises(DataError, match="2 actual labels but 1 predictions"):
        write_confusion_csv(["a", "b"], ["a"], tmp_path / "c.csv")
    with pytest.raises(DataError, match="empty"):
        write_history_csv([], tmp_path / "h.csv")
    with pytest.raises(DataError, match="no 'epoch' key"):
        write_history_csv([{"train_loss": 1.0}], tmp_path / "h.csv")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_leaves_old_file_untouched_when_writing_fails(tmp_path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as temp:
        temp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
