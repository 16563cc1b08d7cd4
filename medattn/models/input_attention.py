"""Input attention (Adhikari et al., seed 002): an attention layer right after the input.

A small learned network looks at the image and produces a per-image map A(x) in [0, 1] at
input resolution; the image CNN sees ``x * A(x)``. Trained end to end with the classifier, so
the map is what the classifier is allowed to see — which is why an expert's correction of the
map (the feedback loss, ``medattn.training.feedback_loss``) changes what the model uses.

    gate: conv(C -> K, 3x3) -> ReLU -> conv(K -> K, 3x3, dilation 2) -> ReLU
          -> conv(K -> K, 3x3, dilation 4) -> ReLU -> conv(K -> 1, 1x1) -> sigmoid

The dilations give a 15 px receptive field at the cost of three small convolutions, enough to
tell a compact marker from a lesion. ``model.K`` is the hidden width. Like seed 001 the map
pays λ·mean(A) (``train.lambda_l1``), so it stays sparse enough to say something.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from medattn.models.base import AttentionModel, LossSettings, register_attention
from medattn.models.spec import ModelSpec

#: the last layer's bias at start: sigmoid(2) ~ 0.88, so the untrained gate passes the image
#: almost unchanged and the classifier can start learning before the gate has an opinion
INITIAL_GATE_BIAS = 2.0


class InputGate(nn.Module):
    """Per-pixel importance from the image itself: (B, C, H, W) -> (B, 1, H, W) in (0, 1)."""

    def __init__(self, in_channels: int, hidden_channels: int):
        super().__init__()
        k = hidden_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, k, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(k, k, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(k, k, 3, padding=4, dilation=4), nn.ReLU(inplace=True),
        )
        self.score = nn.Conv2d(k, 1, kernel_size=1)
        nn.init.constant_(self.score.bias, INITIAL_GATE_BIAS)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W) pre-sigmoid scores."""
        return self.score(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scores(x))


@register_attention("input_attention")
class InputAttention(AttentionModel):
    """Image CNN behind a learned per-image input gate: ``forward(x) -> (logits, A(x))``."""

    #: the map gates the input and is differentiable per image: feedback can target it directly
    attention_gates_input: ClassVar[bool] = True

    def __init__(self, image_cnn: nn.Module, in_channels: int, hidden_channels: int):
        super().__init__()
        self.image_cnn = image_cnn
        self.gate = InputGate(in_channels, hidden_channels)

    @classmethod
    def build(cls, spec: ModelSpec, image_cnn: nn.Module) -> "InputAttention":
        return cls(image_cnn, spec.in_channels, spec.K)

    def loss_terms(self, attention: torch.Tensor, settings: LossSettings) -> dict[str, torch.Tensor]:
        return {"attention_l1": settings.lambda_l1 * attention.mean()}

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate.scores(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.gate(x)
        return self.image_cnn(x * attention), attention

    def forward_with_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.gate.scores(x)
        attention = torch.sigmoid(scores)  # == self.gate(x), computed once
        return self.image_cnn(x * attention), attention, scores
