"""Non-deep baselines the model has to beat, scored on the same test split.

Seed 001 compares its attention CNN with logistic regression (LR) and an SVM on the raw
pixels, with their hyper-parameters grid-searched. ``pixel_logistic_regression`` is that LR:
every image is area-downsampled to at most ``max_side`` pixels a side (seed 001's images are
small; at 96-224 px the full pixel vector only makes the fit slow, not better), flattened,
standardised with the training split's per-feature mean and spread, and fed to scikit-learn's
L2-regularised LogisticRegression, whose C is chosen by stratified 3-fold cross-validation on
the training split (by macro-F1; a tie goes to the stronger regularisation) when every class
has at least 3 training images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.preprocessing import StandardScaler

from medattn.errors import DataError

# p >> n (thousands of pixels, hundreds of images): strong L2 regularisation is the sensible range
LOGREG_C_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
LOGREG_DEFAULT_C = 0.01
_CV_FOLDS = 3
_MAX_ITER = 2000


def pixel_logistic_regression(
    train_images_uint8: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_images_uint8: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    seed: int = 0,
    max_side: int = 32,
) -> dict[str, Any]:
    """Fit LR on standardised raw pixels of (N, C, H, W) uint8 training images; score the test set.

    Returns ``{"accuracy", "macro_f1", "C", "side"}``: test accuracy, macro-F1 over the classes
    present in ``test_labels`` (the convention of :mod:`medattn.evaluation.metrics`), the chosen
    inverse regularisation strength and the side length the images were downsampled to.
    """
    train_x, side = _pixel_features(train_images_uint8, "train_images_uint8", max_side)
    test_x, _ = _pixel_features(test_images_uint8, "test_images_uint8", max_side)
    train_y = _labels(train_labels, "train_labels", len(train_x))
    test_y = _labels(test_labels, "test_labels", len(test_x))
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"train images give {train_x.shape[1]} pixel features but test images {test_x.shape[1]}; "
                        "both splits must have the same channels and size")
    classes, counts = np.unique(train_y, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"a logistic-regression baseline needs at least 2 classes in train_labels, got {classes.tolist()}")

    scaler = StandardScaler().fit(train_x)
    train_z, test_z = scaler.transform(train_x), scaler.transform(test_x)
    chosen_c = _cross_validated_c(train_z, train_y, seed) if counts.min() >= _CV_FOLDS else LOGREG_DEFAULT_C
    model = LogisticRegression(C=chosen_c, max_iter=_MAX_ITER, random_state=seed).fit(train_z, train_y)
    predicted = model.predict(test_z)
    present = np.unique(test_y)
    return {
        "accuracy": float(np.mean(predicted == test_y)),
        "macro_f1": float(f1_score(test_y, predicted, labels=present, average="macro", zero_division=0)),
        "C": chosen_c,
        "side": side,
    }


def _cross_validated_c(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    folds = StratifiedKFold(n_splits=_CV_FOLDS, shuffle=True, random_state=seed)
    scores = [cross_val_score(LogisticRegression(C=c, max_iter=_MAX_ITER, random_state=seed), features, labels,
                              cv=folds, scoring="f1_macro").mean() for c in LOGREG_C_GRID]
    return LOGREG_C_GRID[int(np.argmax(scores))]  # argmax takes the first, i.e. smallest C, on a tie


def _pixel_features(images: torch.Tensor | np.ndarray, name: str, max_side: int) -> tuple[np.ndarray, int]:
    """(N, C * s * s) float32 pixel vectors in [0, 1], area-downsampled so that s <= max_side."""
    array = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if array.ndim != 4 or array.dtype != torch.uint8:
        raise DataError(f"{name} must be uint8 images (N, C, H, W), got {tuple(array.shape)} {array.dtype}")
    if len(array) == 0:
        raise DataError(f"{name} holds no image")
    height, width = array.shape[2:]
    side = min(max_side, height, width)
    pixels = array.float() / 255.0
    if (height, width) != (side, side):
        pixels = F.interpolate(pixels, size=(side, side), mode="area")
    return pixels.reshape(len(pixels), -1).numpy(), side


def _labels(labels: torch.Tensor | np.ndarray, name: str, n_images: int) -> np.ndarray:
    array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.shape != (n_images,) or array.dtype.kind not in "iu":
        raise DataError(f"{name} must be {n_images} integer labels (one per image), got {array.shape} {array.dtype}")
    return array.astype(np.int64)
