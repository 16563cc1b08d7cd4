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
spatial map (seed 001) is the same for every image and is broadcast without copying.
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


def attention_faithfulness(
    attention: np.ndarray, masks: np.ndarray, k_percent: float
) -> dict[str, Any]:
    """Mean faithfulness scores over the images with a non-empty mask.

    Keys: ``n_images_with_mask``, ``topk_percent``, ``mass_inside_model``,
    ``mass_inside_uniform``, ``mass_inside_ratio`` (model / uniform: 1 = chance, higher is
    better), ``topk_iou_model``, ``topk_iou_chance`` and ``topk_iou_ratio``. Means are None when
    no image has a mask (e.g. a dataset without segmentations).
    """
    model_mass = attention_mass_inside(attention, masks)
    uniform_mass = uniform_mass_inside(masks)
    model_iou = topk_iou(attention, masks, k_percent)
    chance_iou = chance_topk_iou(masks, k_percent)
    scored = ~np.isnan(uniform_mass)
    result: dict[str, Any] = {
        "n_images_with_mask": int(scored.sum()),
        "topk_percent": float(k_percent),
    }
    if not scored.any():
        for key in (
            "mass_inside_model",
            "mass_inside_uniform",
            "mass_inside_ratio",
            "topk_iou_model",
            "topk_iou_chance",
            "topk_iou_ratio",
        ):
            result[key] = None
        return result
    mass_model, mass_uniform = float(model_mass[scored].mean()), float(uniform_mass[scored].mean())
    iou_model, iou_chance = float(model_iou[scored].mean()), float(chance_iou[scored].mean())
    result.update(
        mass_inside_model=mass_model,
        mass_inside_uniform=mass_uniform,
        mass_inside_ratio=mass_model / mass_uniform,
        topk_iou_model=iou_model,
        topk_iou_chance=iou_chance,
        topk_iou_ratio=iou_model / iou_chance if iou_chance > 0 else None,
    )
    return result


def topk_count(pixels: int, k_percent: float) -> int:
    """How many pixels "top k%" of ``pixels`` means: ceil(k% * pixels), at least 1."""
    if not (isinstance(k_percent, numbers.Real) and 0 < k_percent <= 100):
        raise ParamError(f"evaluate.topk_percent must be in (0, 100], got {k_percent!r}")
    # Round away float noise first, so that e.g. 7% of 100 pixels is 7, not ceil(7.000000001) = 8.
    return max(1, math.ceil(round(k_percent * pixels / 100.0, 9)))


def _kth_largest(att: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each (H, W) map, (N', 1, 1); a broadcast global map is ranked once."""
    if att.strides[0] == 0:
        return np.broadcast_to(_kth_largest(att[:1].copy(), k), (att.shape[0], 1, 1))
    flat = att.reshape(att.shape[0], -1)
    return -np.partition(-flat, k - 1, axis=1)[:, k - 1].reshape(-1, 1, 1)


def _topk_split(att: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(above, tied, share)``: the pixels strictly above each map's k-th value (surely in the
    top k), those equal to it, and the share of the tied pixels the remaining places go to."""
    threshold = _kth_largest(att, k)
    above = att > threshold
    tied = att == threshold
    share = (k - above.sum(axis=(1, 2))) / tied.sum(axis=(1, 2))
    return above, tied, share


def _as_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks; uint8 0/255 masks read from PNGs work too (non-zero = lesion)."""
    array = np.asarray(masks)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise DataError(f"masks must have shape (N, H, W), got {array.shape}")
    return array.astype(bool, copy=False)


def _aligned(attention: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention as float64 (N, H, W) (broadcast view when global) next to the (N, H, W) masks."""
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
    return np.broadcast_to(att, lesion.shape), lesion
