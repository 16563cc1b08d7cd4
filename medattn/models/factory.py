"""The one place models are built: ``create_model(spec) -> AttentionModel``.

Backbones come from :mod:`medattn.models.backbones`, attention methods from the registry of
:mod:`medattn.models.base` (each method registers itself in its own module). Every model
follows the contract ``model(x) -> (logits, attention)`` with ``attention`` a (B, 1, H, W)
map in [0, 1] at input resolution.
"""

from __future__ import annotations

from typing import Optional

import torch

from medattn.models.backbones import BACKBONES, build_backbone
from medattn.models.base import AttentionModel, attention_class, available_attentions
from medattn.models.spec import ModelSpec

__all__ = ["ModelSpec", "available_attentions", "available_backbones", "create_model", "spec_for_training"]


def available_backbones() -> tuple[str, ...]:
    return BACKBONES


def spec_for_training(spec: ModelSpec, train_images: torch.Tensor) -> ModelSpec:
    """``spec`` completed with what the training images decide for its method (e.g. NC)."""
    return attention_class(spec.attention).configure_spec(spec, train_images)


def create_model(spec: ModelSpec, pretrained_weights: Optional[str] = None) -> AttentionModel:
    """Build the attention model described by ``spec`` (random init unless a local weights file is given)."""
    method = attention_class(spec.attention)  # unknown names fail before a large backbone is built
    image_cnn = build_backbone(spec.backbone, spec.num_classes, spec.in_channels, pretrained_weights,
                               imagenet_pretrained=spec.imagenet_pretrained or pretrained_weights is not None)
    return method.build(spec, image_cnn)
