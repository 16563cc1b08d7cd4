"""Classification metrics for one set of test predictions.

``classification_metrics`` returns one plain dict (Python numbers, lists, nested dicts) that
the evaluate stage logs to MLflow and hands to ``reports.write_metrics_json`` for DVC.

Conventions, so that numbers from different runs are comparable:

* Macro averages run over the classes that occur in ``y_true`` (support > 0). A class with no
  test image has no recall to speak of; predicting it wrongly is still punished, because every
  such prediction is a miss for the true class.
* A precision (or F1) whose denominator is zero is reported as 0, not as NaN.
* The majority baseline always predicts ``majority_label`` (the most frequent *training*
  class, which the caller knows and the test set does not) and is scored the same way.
* One-vs-rest ROC AUC needs, for a class, both positives and negatives in ``y_true``; a class
  without either gets ``None`` and is left out of the macro AUC (``None`` when no class has one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from medattn.errors import DataError


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    y_prob: np.ndarray | None,
    class_names: Sequence[str],
    majority_label: int,
) -> dict[str, Any]:
    """Score integer predictions ``y_pred`` (and optional (N, C) probabilities) against ``y_true``.

    Returns a dict with keys ``n_images``, ``accuracy``, ``macro_precision``, ``macro_recall``,
    ``macro_f1``, ``per_class`` (class name -> precision, recall, f1, support),
    ``confusion_matrix`` (C x C list of lists, rows = actual, columns = predicted),
    ``baseline`` (majority_label, majority_class, accuracy, macro_f1), ``roc_auc_ovr``
    (macro one-vs-rest AUC or None) and ``roc_auc_per_class`` (class name -> AUC or None).
    """
    names = [str(name) for name in class_names]
    n_classes = len(names)
    if n_classes < 2:
        raise DataError(f"class_names must name at least 2 classes, got {names!r}")
    truth = _as_labels(y_true, "y_true", n_classes)
    predicted = _as_labels(y_pred, "y_pred", n_classes)
    if truth.shape != predicted.shape:
        raise DataError(f"y_true has {truth.size} labels but y_pred has {predicted.size}")
    if truth.size == 0:
        raise DataError("cannot score an empty test set (y_true has no labels)")
    if not 0 <= int(majority_label) < n_classes:
        raise DataError(
            f"majority_label {majority_label} is not a class index in 0..{n_classes - 1}"
        )

    labels = np.arange(n_classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, average=None, zero_division=0
    )
    present = support > 0
    baseline_prediction = np.full_like(truth, int(majority_label))
    _, _, baseline_f1, _ = precision_recall_fscore_support(
        truth, baseline_prediction, labels=labels, average=None, zero_division=0
    )
    auc_per_class = _roc_auc_per_class(truth, y_prob, n_classes)
    defined_aucs = [auc for auc in auc_per_class if auc is not None]

    return {
        "n_images": int(truth.size),
        "accuracy": float(np.mean(truth == predicted)),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
        "baseline": {
            "majority_label": int(majority_label),
            "majority_class": names[int(majority_label)],
            "accuracy": float(np.mean(truth == int(majority_label))),
            "macro_f1": float(baseline_f1[present].mean()),
        },
        "roc_auc_ovr": float(np.mean(defined_aucs)) if defined_aucs else None,
        "roc_auc_per_class": dict(zip(names, auc_per_class, strict=True)),
    }


def _as_labels(values: Sequence[int] | np.ndarray, name: str, n_classes: int) -> np.ndarray:
    """A 1-D int array of class indices, or a DataError saying which argument is wrong."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{name} must be a 1-D sequence of class indices, got shape {array.shape}")
    # Whole-valued floats (e.g. labels that went through a float tensor) are accepted as is.
    whole_floats = array.dtype.kind == "f" and bool(np.all(np.isfinite(array) & (array % 1 == 0)))
    if array.size and array.dtype.kind not in "iu" and not whole_floats:
        raise DataError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    outside = (array < 0) | (array >= n_classes)
    if outside.any():
        raise DataError(
            f"{name} holds label {int(array[outside][0])}, outside 0..{n_classes - 1} "
            f"({n_classes} class names)"
        )
    return array


def _roc_auc_per_class(
    truth: np.ndarray, y_prob: np.ndarray | None, n_classes: int
) -> list[float | None]:
    """One-vs-rest AUC per class; None without y_prob or without positives and negatives."""
    if y_prob is None:
        return [None] * n_classes
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.shape != (truth.size, n_classes):
        raise DataError(
            f"y_prob must be ({truth.size}, {n_classes}) (images, classes), got {prob.shape}"
        )
    if not np.isfinite(prob).all():
        raise DataError("y_prob holds NaN or infinite values")
    aucs: list[float | None] = []
    for c in range(n_classes):
        is_positive = truth == c
        if is_positive.all() or not is_positive.any():
            aucs.append(None)
        else:
            aucs.append(float(roc_auc_score(is_positive, prob[:, c])))
    return aucs
