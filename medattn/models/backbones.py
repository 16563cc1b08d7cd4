"""Image CNNs ("image CNN" in seed 001) behind one table.

Each entry builds a classifier ``nn.Module`` mapping (B, C, H, W) images to (B, num_classes)
logits. torchvision architectures are built without weights; when a local weights file is
given it is loaded into the ImageNet-shaped network *before* the head is replaced, so
torchvision's own ``*.pth`` files (e.g. from ``~/.cache/torch/hub/checkpoints``) work as is.
Nothing is ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torchvision import models as tvm

from medattn.errors import ModelError


class SmallCNN(nn.Module):
    """Fast default image CNN for CPU demos: four conv stages, global average + max pooling.

    One 3x3 convolution per stage keeps a training epoch of a few hundred 96 px images to
    seconds on two CPU cores. Max pooling next to average pooling matters for lesion grading:
    a few small lesions change the max response strongly while barely moving the average.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, dropout: float = 0.2):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 8]
        stages: list[nn.Module] = []
        for i in range(4):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            stages.append(nn.Sequential(*layers))
        # named stages so multi-level attention (MLDAM) can hook features.1 .. features.3
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * chans[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


@dataclass(frozen=True)
class BackboneEntry:
    build: Callable[[], nn.Module]  # ImageNet-shaped network (1000 classes)
    replace_head: Callable[[nn.Module, int], None]


def _fc_head(net: nn.Module, num_classes: int) -> None:
    net.fc = nn.Linear(net.fc.in_features, num_classes)


def _densenet_head(net: nn.Module, num_classes: int) -> None:
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)


def _vgg_head(net: nn.Module, num_classes: int) -> None:
    net.classifier[6] = nn.Linear(net.classifier[6].in_features, num_classes)


_TORCHVISION: dict[str, BackboneEntry] = {
    "vgg16": BackboneEntry(lambda: tvm.vgg16(weights=None), _vgg_head),
    "resnet50": BackboneEntry(lambda: tvm.resnet50(weights=None), _fc_head),
    "resnet152": BackboneEntry(lambda: tvm.resnet152(weights=None), _fc_head),
    "densenet121": BackboneEntry(lambda: tvm.densenet121(weights=None), _densenet_head),
    "densenet161": BackboneEntry(lambda: tvm.densenet161(weights=None), _densenet_head),
    # aux heads only matter for ImageNet training; init_weights=False skips a slow scipy init
    "googlenet": BackboneEntry(
        lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=False), _fc_head
    ),
}

BACKBONES: tuple[str, ...] = ("small_cnn", *_TORCHVISION)


def _load_local_weights(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"pretrained weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelError(f"cannot read pretrained weights {path}: {exc.__class__.__name__}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
        raise ModelError(f"pretrained weights {path} do not fit this backbone: {first}") from exc


def build_backbone(
    name: str, num_classes: int, in_channels: int = 3, pretrained_weights: Optional[str] = None,
    imagenet_pretrained: Optional[bool] = None,
) -> nn.Module:
    """Build image CNN ``name`` with a ``num_classes`` head (weights only from a local file)."""
    if name == "small_cnn":
        if pretrained_weights:
            raise ModelError("model.pretrained_weights is not supported for small_cnn (it has no ImageNet weights)")
        return SmallCNN(num_classes, in_channels)
    if name not in _TORCHVISION:
        raise ModelError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    if in_channels != 3:
        raise ModelError(f"backbone {name} expects 3-channel images, got {in_channels}")
    entry = _TORCHVISION[name]
    net = entry.build()
    if pretrained_weights:
        _load_local_weights(net, Path(pretrained_weights))
    entry.replace_head(net, num_classes)
    return net
