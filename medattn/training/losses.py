"""Training losses.

Eq. (1) of seed 001: CE + lambda * |M|. We normalise the L1 term by the number of pixels,
``lambda * mean(M)`` (M is in [0, 1], so the term is lambda times the average importance):
this keeps lambda's meaning independent of the image size, matching the paper's search range
{0.1, 0.01, 0.001, 0.0001} for 224 x 224 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor
    cross_entropy: torch.Tensor
    attention_l1: torch.Tensor


def attention_classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention: torch.Tensor,
    lambda_l1: float,
    l1_on_attention: bool,
) -> LossTerms:
    """Cross-entropy plus the (pixel-averaged) L1 penalty on the attention map.

    ``attention`` may be a global map broadcast over the batch (an expanded view): its mean
    equals the mean of the single map, so the penalty is the same for any batch size.
    """
    ce = F.cross_entropy(logits, labels)
    l1 = attention.mean() if l1_on_attention else attention.new_zeros(())
    return LossTerms(total=ce + lambda_l1 * l1, cross_entropy=ce, attention_l1=l1)
