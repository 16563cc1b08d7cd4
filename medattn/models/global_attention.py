"""Global spatial attention (Xu et al., seed 001).

One H x W weight map M is shared by every image. M is the output of a *pixel CNN* that
classifies pixels as important / unimportant from the *pixel representation* P: the training
images stacked along the channel axis, so each pixel's feature vector is the intensities of
all N training images (NC values) at that pixel.

    pixel CNN: conv(NC -> K, 3x3, stride 1, pad 1) -> ReLU -> conv(K -> 1, 1x1) -> sigmoid
    parameters: K(9NC + 1) + (K + 1)

Images are multiplied by M and fed to any image CNN. Algorithm 1 trains both jointly until
the cut-off epoch E, then calls :meth:`GlobalPixelAttention.freeze`: M is computed once,
kept as a buffer, and the pixel CNN receives no more updates. Only the frozen M is saved, so a
served model needs neither P nor the pixel CNN's input.
"""

from __future__ import annotations

import torch
from torch import nn


class PixelCNN(nn.Module):
    """Binary pixel classifier of seed 001, Fig. 3: two convolutions and a sigmoid."""

    def __init__(self, n_pixel_channels: int, hidden_channels: int):
        super().__init__()
        self.hidden = nn.Conv2d(n_pixel_channels, hidden_channels, kernel_size=3, stride=1, padding=1)
        self.score = nn.Conv2d(hidden_channels, 1, kernel_size=1)

    def forward(self, pixel_representation: torch.Tensor) -> torch.Tensor:
        """(1, NC, H, W) -> (1, 1, H, W) importance in (0, 1)."""
        return torch.sigmoid(self.score(torch.relu(self.hidden(pixel_representation))))

    @staticmethod
    def expected_parameter_count(n_pixel_channels: int, hidden_channels: int) -> int:
        k, nc = hidden_channels, n_pixel_channels
        return k * (9 * nc + 1) + (k + 1)


class GlobalPixelAttention(nn.Module):
    """Image CNN preceded by one learned global map: ``forward(x) -> (logits, attention)``."""

    l1_on_attention = True  # the training loss adds lambda * mean(M) (Eq. 1)

    def __init__(self, image_cnn: nn.Module, n_pixel_channels: int, hidden_channels: int, image_size: int):
        super().__init__()
        self.image_cnn = image_cnn
        self.pixel_cnn = PixelCNN(n_pixel_channels, hidden_channels)
        self.n_pixel_channels = n_pixel_channels
        self.image_size = image_size
        # P is training data, not a parameter: kept out of the state dict (it can be hundreds of MB).
        self.register_buffer("pixel_representation", torch.empty(0), persistent=False)
        self.register_buffer("frozen_map", torch.ones(1, 1, image_size, image_size))
        self.register_buffer("is_frozen", torch.tensor(False))

    def set_pixel_representation(self, pixels: torch.Tensor) -> None:
        """Attach P, shaped (1, NC, H, W) (already normalised like the model input)."""
        expected = (1, self.n_pixel_channels, self.image_size, self.image_size)
        if tuple(pixels.shape) != expected:
            raise ValueError(f"pixel representation must be {expected}, got {tuple(pixels.shape)}")
        self.pixel_representation = pixels.to(self.frozen_map.device, self.frozen_map.dtype)

    def attention_map(self) -> torch.Tensor:
        """The global map M, (1, 1, H, W)."""
        if bool(self.is_frozen):
            return self.frozen_map
        if self.pixel_representation.numel() == 0:
            raise RuntimeError("GlobalPixelAttention needs set_pixel_representation() before the cut-off epoch")
        return self.pixel_cnn(self.pixel_representation)

    @torch.no_grad()
    def freeze(self) -> None:
        """Algorithm 1, line 4: compute M once and stop optimising the pixel CNN."""
        if not bool(self.is_frozen):
            self.frozen_map.copy_(self.pixel_cnn(self.pixel_representation))
            self.is_frozen.fill_(True)
        self.pixel_cnn.requires_grad_(False)
        self.pixel_representation = torch.empty(0, device=self.frozen_map.device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.attention_map()
        logits = self.image_cnn(x * m)
        return logits, m.expand(x.shape[0], 1, x.shape[2], x.shape[3])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if bool(self.is_frozen):
            self.pixel_cnn.requires_grad_(False)
        return result


class NoAttention(nn.Module):
    """Baseline image CNN under the same contract; its attention is a uniform map of ones."""

    l1_on_attention = False

    def __init__(self, image_cnn: nn.Module):
        super().__init__()
        self.image_cnn = image_cnn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones = x.new_ones(x.shape[0], 1, x.shape[2], x.shape[3])
        return self.image_cnn(x), ones


def pixel_representation_from_images(images: torch.Tensor) -> torch.Tensor:
    """Stack N training images (N, C, H, W) into P (1, N*C, H, W) (Definition 3 of seed 001)."""
    n, c, h, w = images.shape
    return images.reshape(1, n * c, h, w).contiguous()
