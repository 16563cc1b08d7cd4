"""Does the attention map look where the lesions are?

The embedded synthetic fundus set (and IDRiD segmentation subsets) ship ground-truth lesion
masks, so attention quality can be measured instead of eyeballed. Two scores per image, both
computed only for images whose mask is non-empty (an image without lesions says nothing about
where the model should look; those images get NaN and are left out of every mean):

* **mass inside** = sum(A * mask) / sum(A): the share of the attention mass that falls on lesion
  pixels. A uniform map scores exactly the mask's area fraction, which is the chance level the
  model has to beat; an all-zero map expresses no preference and is scored as uniform.
* **top-k% IoU** = |T ∩ mask| / |T ∪ mask|, where T is the k = ceil(k% of H*W) pixels with the
  highest attention. Pixels tied at the k-th value share the remaining places evenly: the score
  is the expectation under a random tie-break (taken as a ratio of expectations, like the chance
  level). Any fixed tie-break would be arbitrary, and maps often tie: seed 001's sigmoid
  saturates to exactly 0 or 1 over large regions. A flat map therefore scores the chance IoU.

Attention may be given per image (N, H, W), with a channel axis (N, 1, H, W) as the model
contract returns it, or once for all images ((H, W), (1, H, W) or (1, 1, H, W)): a global
spatial map (seed 001) is the same for every image, is ranked once and is broadcast against
the masks by numpy, never copied N times.

A global map has a second, stronger reference than the uniform map: the **lesion-frequency
prior**, the share of training images with a lesion at each pixel. It is the best
image-independent map one could draw from the training masks alone, so a global attention map
that merely matches it has learnt where lesions *usually* are, nothing more;
``attention_faithfulness(..., prior=lesion_frequency_map(train_masks))`` reports both.

No image with a mask (every real source: none ships lesion masks for its grading task) means
faithfulness cannot be measured: the summary says ``available: False`` and holds no scores.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from medattn.errors import DataError, ParamError


def attention_mass_inside(attention: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-image share of the attention mass inside the mask, (N,); NaN where the mask is empty."""
    att, lesion = _aligned(attention, masks)
    has_mask = lesion.any(axis=(1, 2))
    area = lesion.mean(axis=(1, 2))
    total = att.sum(axis=(1, 2), dtype=np.float64)
    inside = (att * lesion).sum(axis=(1, 2), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, inside / np.where(total > 0, total, 1.0), area)
    return np.where(has_mask, share, np.nan)


def uniform_mass_inside(masks: np.ndarray) -> np.ndarray:
    """Per-image mass inside the mask for a uniform map (= mask area fraction); NaN if empty."""
    lesion = _as_masks(masks)
    area = lesion.mean(axis=(1, 2), dtype=np.float64)
    return np.where(lesion.any(axis=(1, 2)), area, np.nan)


def topk_iou(attention: np.ndarray, masks: np.ndarray, k_percent: float) -> np.ndarray:
    """Per-image IoU of the top-``k_percent``% attention pixels with the mask; NaN if empty mask."""
    att, lesion = _aligned(attention, masks)
    k = topk_count(att.shape[1] * att.shape[2], k_percent)
    above, tied, tied_share = _topk_split(att, k)
    # expected |T ∩ mask|: every pixel above the k-th value, plus each tied one with its share
    hits = (above & lesion).sum(axis=(1, 2)) + tied_share * (tied & lesion).sum(axis=(1, 2))
    area = lesion.sum(axis=(1, 2), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, hits / (k + area - hits), np.nan)


def chance_topk_iou(masks: np.ndarray, k_percent: float) -> np.ndarray:
    """Per-image top-k IoU expected from k pixels picked at random (ratio of expectations).

    With mask area a, image size P and k selected pixels, E|T ∩ mask| = k * a / P, so the
    chance IoU is taken as that over (k + a - k * a / P). NaN where the mask is empty.
    """
    lesion = _as_masks(masks)
    pixels = lesion.shape[1] * lesion.shape[2]
    k = topk_count(pixels, k_percent)
    area = lesion.sum(axis=(1, 2), dtype=np.float64)
    expected_hits = k * area / pixels
    return np.where(area > 0, expected_hits / (k + area - expected_hits), np.nan)


SCORE_KEYS = (
    "mass_inside_model",
    "mass_inside_uniform",
    "mass_inside_ratio",
    "topk_iou_model",
    "topk_iou_chance",
    "topk_iou_ratio",
)
PRIOR_SCORE_KEYS = (
    "mass_inside_prior",
    "mass_inside_model_over_prior",
    "topk_iou_prior",
    "topk_iou_model_over_prior",
)


def lesion_frequency_map(masks: np.ndarray) -> np.ndarray:
    """(H, W) share of the given (training) masks with a lesion at each pixel.

    Pass the masks of every image that *has* a mask, empty ones included: a healthy image
    with a known-empty mask says lesions were not there. Raises DataError without masks.
    """
    lesion = _as_masks(masks)
    if lesion.shape[0] == 0:
        raise DataError("a lesion-frequency map needs at least one mask, got none")
    return lesion.mean(axis=0, dtype=np.float64)


def attention_faithfulness(
    attention: np.ndarray,
    masks: np.ndarray,
    k_percent: float,
    prior: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean faithfulness scores over the images with a non-empty mask.

    Keys: ``available`` (False when no image has a mask: then every score is None),
    ``n_images_with_mask``, ``topk_percent``, ``mass_inside_model``, ``mass_inside_uniform``,
    ``mass_inside_ratio`` (model / uniform: 1 = chance, higher is better), ``topk_iou_model``,
    ``topk_iou_chance`` and ``topk_iou_ratio``. With an image-independent ``prior`` map (H, W)
    (see :func:`lesion_frequency_map`) also ``mass_inside_prior``, ``topk_iou_prior`` and the
    ratios ``mass_inside_model_over_prior`` and ``topk_iou_model_over_prior`` (1 = the model's
    attention is as good as the prior; None where the prior scores 0).
    """
    topk_count(1, k_percent)  # a bad evaluate.topk_percent is reported even without masks
    att, lesion = _aligned(attention, masks)  # so are bad shapes
    scored = lesion.any(axis=(1, 2))
    result: dict[str, Any] = {
        "available": bool(scored.any()),
        "n_images_with_mask": int(scored.sum()),
        "topk_percent": float(k_percent),
    }
    keys = SCORE_KEYS + (PRIOR_SCORE_KEYS if prior is not None else ())
    if not scored.any():
        return {**result, **dict.fromkeys(keys)}
    lesion = lesion[scored]
    att = att[scored] if att.shape[0] > 1 else att  # a global map stays one map
    mass_model = _mean(attention_mass_inside(att, lesion))
    mass_uniform = _mean(uniform_mass_inside(lesion))
    iou_model = _mean(topk_iou(att, lesion, k_percent))
    iou_chance = _mean(chance_topk_iou(lesion, k_percent))
    result.update(
        mass_inside_model=mass_model,
        mass_inside_uniform=mass_uniform,
        mass_inside_ratio=mass_model / mass_uniform,
        topk_iou_model=iou_model,
        topk_iou_chance=iou_chance,
        topk_iou_ratio=_ratio(iou_model, iou_chance),
    )
    if prior is not None:
        mass_prior = _mean(attention_mass_inside(prior, lesion))
        iou_prior = _mean(topk_iou(prior, lesion, k_percent))
        result.update(
            mass_inside_prior=mass_prior,
            mass_inside_model_over_prior=_ratio(mass_model, mass_prior),
            topk_iou_prior=iou_prior,
            topk_iou_model_over_prior=_ratio(iou_model, iou_prior),
        )
    return result


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def topk_count(pixels: int, k_percent: float) -> int:
    """How many pixels "top k%" of ``pixels`` means: ceil(k% * pixels), at least 1."""
    if not (isinstance(k_percent, numbers.Real) and 0 < k_percent <= 100):
        raise ParamError(f"evaluate.topk_percent must be in (0, 100], got {k_percent!r}")
    # Round away float noise first, so that e.g. 7% of 100 pixels is 7, not ceil(7.000000001) = 8.
    return max(1, math.ceil(round(k_percent * pixels / 100.0, 9)))


def _kth_largest(att: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each of the M (H, W) maps, (M, 1, 1); M is 1 for a global map."""
    if att.shape[0] == 0:
        return np.empty((0, 1, 1))
    flat = att.reshape(att.shape[0], -1)
    return -np.partition(-flat, k - 1, axis=1)[:, k - 1].reshape(-1, 1, 1)


def _topk_split(att: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(above, tied, share)``: the pixels strictly above each map's k-th value (surely in the
    top k), those equal to it, and the share of the tied pixels the remaining places go to."""
    threshold = _kth_largest(att, k)
    above = att > threshold
    tied = att == threshold
    # the k-th value itself is always tied, so no division by zero for a non-empty map
    share = (k - above.sum(axis=(1, 2))) / np.maximum(tied.sum(axis=(1, 2)), 1)
    return above, tied, share


def _as_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks; uint8 0/255 masks read from PNGs work too (non-zero = lesion)."""
    array = np.asarray(masks)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise DataError(f"masks must have shape (N, H, W), got {array.shape}")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise DataError(f"masks of shape {array.shape} have no pixels")
    return array.astype(bool, copy=False)


def _aligned(attention: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention as float64 (N, H, W), or (1, H, W) for a global map, next to the (N, H, W) masks.

    A global map stays one map: every score broadcasts it against the masks (numpy rules), so
    it is ranked once, not N times. (Testing a broadcast view by its strides is no way to tell:
    numpy also gives a zero stride to any axis of length 0 or 1.)
    """
    lesion = _as_masks(masks)
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim == 4 and att.shape[1] == 1:
        att = att[:, 0]
    if att.ndim == 2:
        att = att[None]
    if (
        att.ndim != 3
        or att.shape[1:] != lesion.shape[1:]
        or att.shape[0] not in (1, lesion.shape[0])
    ):
        raise DataError(
            f"attention of shape {np.shape(attention)} does not match masks {lesion.shape}; "
            "expected (N, H, W), (N, 1, H, W) or one (H, W) map for all images"
        )
    if not np.isfinite(att).all() or (att < 0).any():
        raise DataError("attention maps must be finite and non-negative (the contract is [0, 1])")
    return att, lesion
