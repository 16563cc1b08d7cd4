"""Training losses: cross-entropy plus named, already-weighted terms.

The terms come from the model's own ``loss_terms`` (seed 001's Eq. (1): λ‖M‖₁, which we
normalise by the number of pixels as ``λ · mean(M)``: M is in [0, 1], so the term is λ times
the average importance and λ means the same at any image size, matching the paper's search
range {0.1, 0.01, 0.001, 0.0001} for 224 x 224 inputs) and from ``fit(extra_loss=...)`` (the
expert-feedback loss). A global map broadcast over the batch is an expanded view: its mean
equals the single map's, so the penalty does not depend on the batch size.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


def total_loss(logits: torch.Tensor, labels: torch.Tensor,
               terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"total", "ce", **terms}``: cross-entropy plus every term (each a scalar)."""
    ce = F.cross_entropy(logits, labels)
    out = {"ce": ce, **terms}
    total = ce
    for value in terms.values():
        total = total + value
    out["total"] = total
    return out
