"""The one place models are built: ``create_model(spec) -> nn.Module``.

Every model follows the contract ``model(x) -> (logits, attention)`` with ``attention`` a
(B, 1, H, W) map in [0, 1] at input resolution. A new attention method is one module plus one
entry in ``_ATTENTIONS``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from torch import nn

from medattn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from medattn.errors import ModelError
from medattn.models.backbones import BACKBONES, build_backbone
from medattn.models.global_attention import GlobalPixelAttention, NoAttention
from medattn.models.mldam import MLDAM_LEVELS, MultiLevelDualAttention

@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and pre-process its input (saved with the weights)."""

    backbone: str
    attention: str
    num_classes: int
    image_size: int
    class_names: tuple[str, ...] = ()
    in_channels: int = 3
    K: int = 32
    # NC of seed 001: channels of the pixel representation (training images x channels)
    n_pixel_channels: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in raw.items() if k in known}
        for key in ("class_names", "mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def _global_pixel(spec: ModelSpec, image_cnn: nn.Module) -> nn.Module:
    if spec.n_pixel_channels < 1:
        raise ModelError("global_pixel attention needs n_pixel_channels >= 1 (training images x channels)")
    return GlobalPixelAttention(image_cnn, spec.n_pixel_channels, spec.K, spec.image_size)


def _mldam(spec: ModelSpec, image_cnn: nn.Module) -> nn.Module:
    return MultiLevelDualAttention(image_cnn, MLDAM_LEVELS[spec.backbone], spec.image_size, spec.in_channels)


def _none(spec: ModelSpec, image_cnn: nn.Module) -> nn.Module:
    return NoAttention(image_cnn)


_ATTENTIONS: dict[str, Callable[[ModelSpec, nn.Module], nn.Module]] = {
    "global_pixel": _global_pixel,
    "mldam": _mldam,
    "none": _none,
}


def available_backbones() -> tuple[str, ...]:
    return BACKBONES


def available_attentions() -> tuple[str, ...]:
    return tuple(_ATTENTIONS)


def create_model(spec: ModelSpec, pretrained_weights: Optional[str] = None) -> nn.Module:
    """Build the attention model described by ``spec`` (random init unless a local weights file is given)."""
    if spec.attention not in _ATTENTIONS:
        raise ModelError(f"unknown attention {spec.attention!r} (choose from {', '.join(_ATTENTIONS)})")
    image_cnn = build_backbone(spec.backbone, spec.num_classes, spec.in_channels, pretrained_weights)
    return _ATTENTIONS[spec.attention](spec, image_cnn)
