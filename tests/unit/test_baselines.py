"""The raw-pixel logistic-regression baseline on constructed images whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medattn.errors import DataError
from medattn.evaluation.baselines import (
    LOGREG_C_GRID,
    LOGREG_DEFAULT_C,
    pixel_logistic_regression,
)


def patch_images(labels: np.ndarray, side: int, seed: int, channels: int = 3) -> np.ndarray:
    """Noise images; class 1 has a bright square in the top-left corner, class 0 does not."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, size=(len(labels), channels, side, side), dtype=np.uint8)
    images[labels == 1, :, : side // 3, : side // 3] += 120
    return images


def test_a_pixel_signal_is_learnt_and_the_result_is_reproducible() -> None:
    train_y = np.array([0, 1] * 20)
    test_y = np.array([0, 1] * 10)
    train_x, test_x = patch_images(train_y, 48, seed=1), patch_images(test_y, 48, seed=2)
    result = pixel_logistic_regression(torch.from_numpy(train_x), torch.from_numpy(train_y),
                                       torch.from_numpy(test_x), torch.from_numpy(test_y), seed=0)
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
    assert result["C"] in LOGREG_C_GRID
    assert result["side"] == 32  # 48 px downsampled to the default max side
    # numpy input gives the same answer, and the same seed the same fit
    assert pixel_logistic_regression(train_x, train_y, test_x, test_y, seed=0) == result


def test_labels_unrelated_to_the_pixels_stay_near_chance() -> None:
    rng = np.random.default_rng(5)
    train_y, test_y = rng.integers(0, 2, 60), rng.integers(0, 2, 200)
    train_x = rng.integers(0, 256, size=(60, 1, 16, 16), dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(200, 1, 16, 16), dtype=np.uint8)
    result = pixel_logistic_regression(train_x, train_y, test_x, test_y)
    assert 0.3 < result["accuracy"] < 0.7


def test_too_few_images_per_class_to_cross_validate_uses_the_default_c() -> None:
    train_y, test_y = np.array([0, 0, 1, 1]), np.array([0, 1])
    result = pixel_logistic_regression(patch_images(train_y, 12, 3, channels=1), train_y,
                                       patch_images(test_y, 12, 4, channels=1), test_y)
    assert result["C"] == LOGREG_DEFAULT_C and result["side"] == 12
    assert 0.0 <= result["macro_f1"] <= 1.0


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda a: {**a, "train_images_uint8": a["train_images_uint8"].astype(np.float32)}, "train_images_uint8 must be uint8"),
        (lambda a: {**a, "test_images_uint8": a["test_images_uint8"][:, 0]}, "test_images_uint8 must be uint8"),
        (lambda a: {**a, "train_labels": a["train_labels"][:-1]}, "train_labels must be 6 integer labels"),
        (lambda a: {**a, "train_labels": np.zeros(6, dtype=np.int64)}, "at least 2 classes"),
        (lambda a: {**a, "test_images_uint8": a["test_images_uint8"][:, :1]}, "same channels and size"),
        (lambda a: {**a, "test_images_uint8": a["test_images_uint8"][:0], "test_labels": a["test_labels"][:0]},
         "holds no image"),
    ],
)
def test_bad_input_names_what_is_wrong(change, needle: str) -> None:
    train_y, test_y = np.array([0, 1] * 3), np.array([0, 1])
    arguments = {"train_images_uint8": patch_images(train_y, 8, 0), "train_labels": train_y,
                 "test_images_uint8": patch_images(test_y, 8, 1), "test_labels": test_y}
    with pytest.raises(DataError, match=needle):
        pixel_logistic_regression(**change(arguments))
