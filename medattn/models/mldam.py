"""Multi-level dual attention (MLDAM; Mishra et al., as adapted in seed 000).

At several depths of the image CNN the feature map f (B, C, h, w) is re-weighted by
*channel* attention a_c (squeeze-and-excitation: which feature maps matter) and *position*
attention a_p (a 1x1 convolution + sigmoid: where in the image it matters):

    f' = f + f * a_c * a_p

The residual term keeps a freshly initialised attention block from cutting the signal of a
(possibly pretrained) backbone. The blocks are attached with forward hooks on named modules,
so one wrapper serves every backbone in the factory. The hooks are small objects holding their
block and owner (not closures), so ``copy.deepcopy`` of the model re-points them at the copy. The exposed attention map is the mean of
the position maps of all levels, upsampled to the input resolution: per image, in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medattn.errors import ModelError
from medattn.models.base import AttentionModel, register_attention
from medattn.models.spec import ModelSpec

# Which modules' outputs are re-weighted, per backbone: the last three resolution levels.
MLDAM_LEVELS: dict[str, tuple[str, ...]] = {
    "small_cnn": ("features.1", "features.2", "features.3"),
    "vgg16": ("features.16", "features.23", "features.30"),
    "resnet50": ("layer2", "layer3", "layer4"),
    "resnet152": ("layer2", "layer3", "layer4"),
    "densenet121": ("features.denseblock2", "features.denseblock3", "features.denseblock4"),
    "densenet161": ("features.denseblock2", "features.denseblock3", "features.denseblock4"),
    "googlenet": ("inception3b", "inception4e", "inception5b"),
}


class DualAttention(nn.Module):
    """Channel (SE) and position attention on one feature level."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.position = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_p = self.position(f)
        return f + f * self.channel(f) * a_p, a_p


class _LevelHook:
    """Forward hook re-weighting one level's output; an object (not a closure) so deepcopy maps it."""

    def __init__(self, owner: "MultiLevelDualAttention", block: DualAttention):
        self.owner = owner
        self.block = block

    def __call__(self, _module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        reweighted, a_p = self.block(output)
        self.owner._maps.append(a_p)
        return reweighted


@register_attention("mldam")
class MultiLevelDualAttention(AttentionModel):
    """Image CNN with MLDAM blocks hooked onto ``levels``: ``forward(x) -> (logits, attention)``."""

    def __init__(self, image_cnn: nn.Module, levels: tuple[str, ...], image_size: int, in_channels: int = 3):
        super().__init__()
        self.image_cnn = image_cnn
        self.levels = levels
        modules = dict(image_cnn.named_modules())
        missing = [name for name in levels if name not in modules]
        if missing:
            raise ValueError(f"MLDAM levels not found in the backbone: {missing}")
        channels = self._probe_channels(modules, in_channels, image_size)
        self.blocks = nn.ModuleList(DualAttention(c) for c in channels)
        self._maps: list[torch.Tensor] = []
        for block, name in zip(self.blocks, levels):
            modules[name].register_forward_hook(_LevelHook(self, block))

    @classmethod
    def build(cls, spec: ModelSpec, image_cnn: nn.Module) -> "MultiLevelDualAttention":
        if spec.backbone not in MLDAM_LEVELS:
            raise ModelError(f"mldam has no feature levels for backbone {spec.backbone!r} "
                             f"(known: {', '.join(MLDAM_LEVELS)})")
        return cls(image_cnn, MLDAM_LEVELS[spec.backbone], spec.image_size, spec.in_channels)

    def _probe_channels(self, modules: dict[str, nn.Module], in_channels: int, image_size: int) -> list[int]:
        seen: dict[str, int] = {}
        handles = [
            modules[name].register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.shape[1]))
            for name in self.levels
        ]
        was_training = self.image_cnn.training
        self.image_cnn.eval()
        with torch.no_grad():
            self.image_cnn(torch.zeros(1, in_channels, image_size, image_size))
        self.image_cnn.train(was_training)
        for h in handles:
            h.remove()
        return [seen[name] for name in self.levels]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._maps = []
        logits = self.image_cnn(x)
        size = x.shape[-2:]
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in self._maps]
        self._maps = []
        attention = torch.stack(maps, dim=0).mean(dim=0).clamp(0.0, 1.0)
        return logits, attention
