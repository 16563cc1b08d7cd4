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


#: below this many entries of P (NC x HW) the exact SVD is cheap; above it the randomised one
EXACT_SVD_LIMIT = 4_000_000
#: extra random directions of the range finder beyond R, and its power iterations (Halko et al.,
#: 2011, sec. 4.3 / 4.5): 10 and 4 put the randomised subspace within float32 noise of the exact
#: one on training images, whose singular values decay fast past the first few
SVD_OVERSAMPLING = 10
SVD_POWER_ITERATIONS = 4
#: the range finder's own seed: the basis depends on P only, never on torch's global RNG state
SVD_SEED = 0


def channel_basis(pixels: torch.Tensor, rank: int, exact_limit: int = EXACT_SVD_LIMIT) -> torch.Tensor:
    """U: an orthonormal (NC, R) basis of the top-``rank`` channel subspace of P (1, NC, H, W).

    Exact SVD (float64) at full rank, where the identity P = U·(Uᵀ·P) must hold to rounding, and
    while P has at most ``exact_limit`` entries; above that a randomised SVD in float32 (about 5x
    faster than float64 at N = 1,500, and the subspace it finds is what matters, not the last
    digits). Both are uncentred and deterministic: the random sketch has its own seeded generator,
    so building a model neither reads nor advances the global RNG, and the columns' signs are fixed
    (largest entry positive) so that the basis does not depend on the LAPACK build either.
    """
    _, nc, h, w = pixels.shape
    if rank >= max_pixel_rank(nc, h, w) or nc * h * w <= exact_limit:
        u, _, _ = torch.linalg.svd(pixels.reshape(nc, h * w).double(), full_matrices=False)
        u = u[:, :rank]
    else:
        u = _randomised_left_basis(pixels.reshape(nc, h * w).float(), rank)
    return _fix_signs(u).to(pixels.dtype).contiguous()


def _randomised_left_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``matrix`` (m, n) by a seeded randomised range finder."""
    m, n = matrix.shape
    width = min(rank + SVD_OVERSAMPLING, m, n)
    generator = torch.Generator(device=matrix.device).manual_seed(SVD_SEED)
    sketch = torch.randn(n, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q, _ = torch.linalg.qr(matrix @ sketch)
    for _ in range(SVD_POWER_ITERATIONS):  # re-orthonormalised each pass: float32 stays stable
        q, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ q)
    u_small, _, _ = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u_small)[:, :rank]


def _fix_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (SVD signs are arbitrary)."""
    rows = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[rows, torch.arange(basis.shape[1], device=basis.device)])
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


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
        # The buffer is what a saved state carries; this Python mirror is what the code reads, so
        # that a forward never syncs with the device to learn a flag (bool() of a CUDA tensor waits
        # for the whole queue). Kept in step on freeze() and on every state-dict load.
        self._frozen = False
        self.pixel_rank = pixel_rank
        self._host_source: Optional[torch.Tensor] = None
        # M of the unfrozen pixel CNN as last computed without autograd, and what it was computed
        # from: evaluation passes reuse it until a parameter or P changes (see _map_key)
        self._cached_map: Optional[torch.Tensor] = None
        self._cached_key: Optional[tuple] = None
        # the pixel CNN still has its construction-time init (no state loaded): see _attach_pixels
        self._fresh_init = True

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
        if not self._frozen:  # resumed after E, or fine-tuned from a saved model: M stays
            self._attach_pixels(self._host_source)
    def on_epoch_start(self, schedule: EpochSchedule) -> None:
        if schedule.epoch > schedule.cutoff_epoch:
            self.freeze()  # Algorithm 1, line 4: M computed once, pixel CNN fixed from now on

    def loss_terms(self, attention: torch.Tensor, settings: LossSettings) -> dict[str, torch.Tensor]:
        # Eq. (1): λ‖M‖₁, pixel-averaged (see medattn.training.losses); a frozen M adds a constant
        return {"attention_l1": settings.lambda_l1 * attention.mean()}

    def before_saving(self) -> None:
        if not self._frozen and self.pixel_representation.numel() == 0 and self._host_source is not None:
            self._attach_pixels(self._host_source)
        self.freeze()  # the saved model carries M, not P
        self._host_source = None

    def epoch_metrics(self) -> dict[str, float]:
        return {"pixel_cnn_frozen": float(self._frozen)}

    @torch.no_grad()
    def global_attention(self) -> torch.Tensor:
        return self.attention_map()[0, 0]

    # -- the method itself -----------------------------------------------------------------
    def _attach_pixels(self, source: torch.Tensor) -> None:
        """Attach P built from the training images: as is, or compressed to its top-R subspace."""
        if self.pixel_rank > 0:
            if self._fresh_init:
                self._init_as_projection(source.shape[1])
            source = compress_pixels(source, channel_basis(source, self.n_pixel_channels))
        self._fresh_init = False
        self.set_pixel_representation(source)

    @torch.no_grad()
    def _init_as_projection(self, source_channels: int) -> None:
        """Scale the fresh first convolution by sqrt(R / NC): the init of the uncompressed model, projected.

        PyTorch initialises a convolution by its fan-in, 9R here against 9NC over P as is, so W' of
        the compressed model started sqrt(NC / R) times larger than W·U, the projection of the
        uncompressed model's init onto U (the same per-entry scale as W: U is orthonormal). Z's
        R channels carry nearly all of P's energy, so the first scores were that much larger too
        (at NC = 1944, R = 32: about 8x), the sigmoid started near saturation and some seeds turned
        M away from the lesions for good. With this scale the compressed model at init IS the
        uncompressed one projected (conv(W·U, Z) = conv(W, P) at full rank), and gradient descent on
        W' is gradient descent on W restricted to span(U) at the same learning rate.
        """
        scale = (self.n_pixel_channels / max(source_channels, self.n_pixel_channels)) ** 0.5
        self.pixel_cnn.hidden.weight.mul_(scale)
        if self.pixel_cnn.hidden.bias is not None:
            self.pixel_cnn.hidden.bias.mul_(scale)

    def set_pixel_representation(self, pixels: torch.Tensor) -> None:
        """Attach P, shaped (1, NC, H, W) (already normalised like the model input)."""
        expected = (1, self.n_pixel_channels, self.image_size, self.image_size)
        if tuple(pixels.shape) != expected:
            raise ModelError(f"pixel representation must be {expected}, got {tuple(pixels.shape)}")
        self.pixel_representation = pixels.to(self.frozen_map.device, self.frozen_map.dtype)
        self._drop_cached_map()

    def attention_map(self) -> torch.Tensor:
        """The global map M, (1, 1, H, W)."""
        if self._frozen:
            return self.frozen_map
        if self.pixel_representation.numel() == 0:
            raise ModelError("GlobalPixelAttention needs its pixel representation (before_training) until it is frozen")
        if torch.is_grad_enabled():  # a training step: M must carry the pixel CNN's graph
            return self.pixel_cnn(self.pixel_representation)
        # Without autograd (validation each epoch, evaluation) M only changes when the pixel CNN's
        # weights or P do: one pixel-CNN pass per optimiser step, not one per evaluated batch.
        key = self._map_key()
        if self._cached_map is None or key != self._cached_key:
            self._cached_map, self._cached_key = self.pixel_cnn(self.pixel_representation), key
        return self._cached_map

    def _map_key(self) -> tuple:
        """What M is a function of: every tensor it is computed from, by storage and in-place version
        (an optimiser step, load_state_dict and copy_ bump ``_version``; .to() gives new storage),
        and the autocast state (under bf16 autocast the same weights give a different M)."""
        tensors = [*self.pixel_cnn.parameters(), self.pixel_representation]
        device = self.pixel_representation.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
                    if torch.is_autocast_enabled(device) else None)
        # (an inference tensor has no version counter: P attached under inference_mode counts as 0)
        return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype) for t in tensors) + (autocast,)

    def _drop_cached_map(self) -> None:
        self._cached_map, self._cached_key = None, None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to() / .cuda() / .double(): a cached M on the old device or dtype must not be reused
        self._drop_cached_map()
        return super()._apply(fn, recurse)

    def attention_logits(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The pixel CNN's scores over P (1, 1, H, W) while it learns; None once M is frozen."""
        if self._frozen or self.pixel_representation.numel() == 0:
            return None
        return self.pixel_cnn.scores(self.pixel_representation)

    @torch.no_grad()
    def freeze(self) -> None:
        """Algorithm 1, line 4: compute M once and stop optimising the pixel CNN."""
        if not self._frozen:
            self.frozen_map.copy_(self.attention_map())
            self.is_frozen.fill_(True)
            self._frozen = True
        self.pixel_cnn.requires_grad_(False)
        self.pixel_representation = torch.empty(0, device=self.frozen_map.device)
        self._drop_cached_map()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.attention_map()
        logits = self.image_cnn(x * m)
        return logits, m.expand(x.shape[0], 1, x.shape[2], x.shape[3])

    def forward_with_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        scores = self.attention_logits(x)
        if scores is None:  # frozen: M is a buffer, there are no scores to move
            return (*self(x), None)
        m = torch.sigmoid(scores)  # == attention_map() while learning: one pixel-CNN pass, not two
        return self.image_cnn(x * m), m.expand(x.shape[0], 1, x.shape[2], x.shape[3]), scores

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Here rather than in load_state_dict: this also runs when the model is loaded as part of
        # a larger module. The one read of the buffer's value per load keeps the mirror in step.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fresh_init = False  # trained weights: never rescaled (see _init_as_projection)
        self._frozen = bool(self.is_frozen)
        self._drop_cached_map()
        # a restored earlier epoch may be unfrozen again: its pixel CNN must train (and P return)
        self.pixel_cnn.requires_grad_(not self._frozen)
