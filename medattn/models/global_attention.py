"""Global spatial attention (Xu et al., seed 001).

One H x W weight map M is shared by every image. M is the output of a *pixel CNN* that
classifies pixels as important / unimportant from the *pixel representation* P: the training
images stacked along the channel axis, so each pixel's feature vector is the intensities of
all N training images (NC values) at that pixel.

    pixel CNN: conv(NC -> K, 3x3, stride 1, pad 1) -> ReLU -> conv(K -> 1, 1x1) -> sigmoid
    parameters: K(9NC + 1) + (K + 1)

**Compressed pixel representation** (``model.pixel_rank: R > 0``). The first convolution is linear
in P's channels, so with P = U·Z (U an orthonormal (NC, R) basis of P's channel space, Z = Uᵀ·P
its R-channel coordinates, from a truncated SVD of P as an NC x HW matrix) conv(W, P) =
conv(W·U, Z): a pixel CNN over Z with R input channels is the same function class when R covers
P's rank, and a controlled approximation below it (what the dropped singular values carry).
Its cost no longer grows with the number of training images: K(9R+1)+(K+1) parameters and an
R-channel convolution per step instead of NC. The SVD is not centred, so the identity is exact.

Images are multiplied by M and fed to any image CNN. Algorithm 1 is this method's hooks on the
one training loop: ``before_training`` builds P from the training split, ``on_epoch_start``
freezes the pixel CNN once the cut-off epoch E has passed (M is computed once and kept as a
buffer), ``loss_terms`` adds λ·mean(M), ``before_saving`` freezes at the kept epoch. Only the
frozen M is saved, so a served model needs neither P nor the pixel CNN's input.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from medattn.errors import ModelError
from medattn.models.base import AttentionModel, EpochSchedule, LossSettings, register_attention
from medattn.models.spec import ModelSpec


class PixelCNN(nn.Module):
    """Binary pixel classifier of seed 001, Fig. 3: two convolutions and a sigmoid."""

    def __init__(self, n_pixel_channels: int, hidden_channels: int):
        super().__init__()
        self.hidden = nn.Conv2d(n_pixel_channels, hidden_channels, kernel_size=3, stride=1, padding=1)
        self.score = nn.Conv2d(hidden_channels, 1, kernel_size=1)

    def scores(self, pixel_representation: torch.Tensor) -> torch.Tensor:
        """(1, NC, H, W) -> (1, 1, H, W) pre-sigmoid importance scores."""
        return self.score(torch.relu(self.hidden(pixel_representation)))

    def forward(self, pixel_representation: torch.Tensor) -> torch.Tensor:
        """(1, NC, H, W) -> (1, 1, H, W) importance in (0, 1)."""
        return torch.sigmoid(self.scores(pixel_representation))

    @staticmethod
    def expected_parameter_count(n_pixel_channels: int, hidden_channels: int) -> int:
        k, nc = hidden_channels, n_pixel_channels
        return k * (9 * nc + 1) + (k + 1)


def pixel_representation_from_images(images: torch.Tensor) -> torch.Tensor:
    """Stack N training images (N, C, H, W) into P (1, N*C, H, W) (Definition 3 of seed 001)."""
    n, c, h, w = images.shape
    return images.reshape(1, n * c, h, w).contiguous()


def max_pixel_rank(n_channels: int, height: int, width: int) -> int:
    """The rank P (NC x HW as a matrix) can have at most: R beyond it adds nothing."""
    return min(n_channels, height * width)


def channel_basis(pixels: torch.Tensor, rank: int) -> torch.Tensor:
    """U: an orthonormal (NC, R) basis of the top-``rank`` channel subspace of P (1, NC, H, W).

    Exact SVD while it is cheap, a seeded randomised one (Halko et al., torch.svd_lowrank) for
    large P; both uncentred, so P ≈ U·(Uᵀ·P) with equality at full rank.
    """
    _, nc, h, w = pixels.shape
    matrix = pixels.reshape(nc, h * w).double()
    if rank >= max_pixel_rank(nc, h, w) or nc * h * w <= 4_000_000:
        u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    else:
        u, _, _ = torch.svd_lowrank(matrix, q=rank, niter=4)
    return u[:, :rank].to(pixels.dtype).contiguous()


def compress_pixels(pixels: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Z = Uᵀ·P, shaped (1, R, H, W)."""
    _, nc, h, w = pixels.shape
    return (basis.T @ pixels.reshape(nc, h * w)).reshape(1, basis.shape[1], h, w)


@register_attention("global_pixel")
class GlobalPixelAttention(AttentionModel):
    """Image CNN preceded by one learned global map: ``forward(x) -> (logits, attention)``."""

    attention_is_global = True

    def __init__(self, image_cnn: nn.Module, n_pixel_channels: int, hidden_channels: int, image_size: int,
                 pixel_rank: int = 0):
        super().__init__()
        self.image_cnn = image_cnn
        self.pixel_cnn = PixelCNN(n_pixel_channels, hidden_channels)
        self.n_pixel_channels = n_pixel_channels
        self.image_size = image_size
        # P is training data, not a parameter: kept out of the state dict (it can be hundreds of MB).
        self.register_buffer("pixel_representation", torch.empty(0), persistent=False)
        self.register_buffer("frozen_map", torch.ones(1, 1, image_size, image_size))
        self.register_buffer("is_frozen", torch.tensor(False))
        self.pixel_rank = pixel_rank
        self._host_source: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, spec: ModelSpec, image_cnn: nn.Module) -> "GlobalPixelAttention":
        if spec.n_pixel_channels < 1:
            raise ModelError("global_pixel attention needs n_pixel_channels >= 1 (training images x channels)")
        return cls(image_cnn, spec.n_pixel_channels, spec.K, spec.image_size, spec.pixel_rank)

    @classmethod
    def configure_spec(cls, spec: ModelSpec, train_images: torch.Tensor) -> ModelSpec:
        from dataclasses import replace

        n, c, h, w = train_images.shape
        channels = n * c if spec.pixel_rank <= 0 else min(spec.pixel_rank, max_pixel_rank(n * c, h, w))
        return replace(spec, n_pixel_channels=channels)

    # -- the hooks of the training loop (Algorithm 1) ---------------------------------------
    def before_training(self, train_images: torch.Tensor) -> None:
        # P on the host is a view of the training images (no copy); kept until saving so that a
        # kept epoch before the cut-off can be frozen after freezing has dropped P from the device
        self._host_source = pixel_representation_from_images(train_images)
        if not bool(self.is_frozen):  # resumed after E, or fine-tuned from a saved model: M stays
            self._attach_pixels(self._host_source)
    def on_epoch_start(self, schedule: EpochSchedule) -> None:
        if schedule.epoch > schedule.cutoff_epoch:
            self.freeze()  # Algorithm 1, line 4: M computed once, pixel CNN fixed from now on

    def loss_terms(self, attention: torch.Tensor, settings: LossSettings) -> dict[str, torch.Tensor]:
        # Eq. (1): λ‖M‖₁, pixel-averaged (see medattn.training.losses); a frozen M adds a constant
        return {"attention_l1": settings.lambda_l1 * attention.mean()}

    def before_saving(self) -> None:
        if not bool(self.is_frozen) and self.pixel_representation.numel() == 0 and self._host_source is not None:
            self._attach_pixels(self._host_source)
        self.freeze()  # the saved model carries M, not P
        self._host_source = None

    def epoch_metrics(self) -> dict[str, float]:
        return {"pixel_cnn_frozen": float(bool(self.is_frozen))}

    @torch.no_grad()
    def global_attention(self) -> torch.Tensor:
        return self.attention_map()[0, 0]

    # -- the method itself -----------------------------------------------------------------
    def _attach_pixels(self, source: torch.Tensor) -> None:
        """Attach P built from the training images: as is, or compressed to its top-R subspace."""
        if self.pixel_rank > 0:
            source = compress_pixels(source, channel_basis(source, self.n_pixel_channels))
        self.set_pixel_representation(source)

    def set_pixel_representation(self, pixels: torch.Tensor) -> None:
        """Attach P, shaped (1, NC, H, W) (already normalised like the model input)."""
        expected = (1, self.n_pixel_channels, self.image_size, self.image_size)
        if tuple(pixels.shape) != expected:
            raise ModelError(f"pixel representation must be {expected}, got {tuple(pixels.shape)}")
        self.pixel_representation = pixels.to(self.frozen_map.device, self.frozen_map.dtype)

    def attention_map(self) -> torch.Tensor:
        """The global map M, (1, 1, H, W)."""
        if bool(self.is_frozen):
            return self.frozen_map
        if self.pixel_representation.numel() == 0:
            raise ModelError("GlobalPixelAttention needs its pixel representation (before_training) until it is frozen")
        return self.pixel_cnn(self.pixel_representation)

    def attention_logits(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The pixel CNN's scores over P (1, 1, H, W) while it learns; None once M is frozen."""
        if bool(self.is_frozen) or self.pixel_representation.numel() == 0:
            return None
        return self.pixel_cnn.scores(self.pixel_representation)

    @torch.no_grad()
    def freeze(self) -> None:
        """Algorithm 1, line 4: compute M once and stop optimising the pixel CNN."""
        if not bool(self.is_frozen):
            self.frozen_map.copy_(self.attention_map())
            self.is_frozen.fill_(True)
        self.pixel_cnn.requires_grad_(False)
        self.pixel_representation = torch.empty(0, device=self.frozen_map.device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.attention_map()
        logits = self.image_cnn(x * m)
        return logits, m.expand(x.shape[0], 1, x.shape[2], x.shape[3])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        # a restored earlier epoch may be unfrozen again: its pixel CNN must train (and P return)
        self.pixel_cnn.requires_grad_(not bool(self.is_frozen))
        return result
