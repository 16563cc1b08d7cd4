"""The no-attention baseline: the plain image CNN under the same contract (a uniform map of ones)."""

from __future__ import annotations

import torch
from torch import nn

from medattn.models.base import AttentionModel, register_attention
from medattn.models.spec import ModelSpec


@register_attention("none")
class NoAttention(AttentionModel):
    def __init__(self, image_cnn: nn.Module):
        super().__init__()
        self.image_cnn = image_cnn

    @classmethod
    def build(cls, spec: ModelSpec, image_cnn: nn.Module) -> "NoAttention":
        return cls(image_cnn)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones = x.new_ones(x.shape[0], 1, x.shape[2], x.shape[3])
        return self.image_cnn(x), ones
