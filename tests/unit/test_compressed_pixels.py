"""The compressed pixel representation: conv(W, P) = conv(W·U, Z) with P = U·Z (issue: global attention at any N)."""

from __future__ import annotations

import pytest
import torch

from medattn.config import ModelParams, TrainParams
from medattn.models.global_attention import (
    PixelCNN,
    channel_basis,
    compress_pixels,
    max_pixel_rank,
    pixel_representation_from_images,
)
from medattn.training.fit import LabelledImages, fit


def _pixels(n: int = 10, size: int = 8, seed: int = 0) -> torch.Tensor:
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return pixel_representation_from_images(images)


def test_compressed_pixel_cnn_equals_the_uncompressed_one_at_full_rank() -> None:
    pixels = _pixels()  # NC = 30 channels, HW = 64: rank <= 30
    rank = max_pixel_rank(30, 8, 8)
    basis = channel_basis(pixels, rank)
    z = compress_pixels(pixels, basis)
    full = PixelCNN(30, 5).double()
    compressed = PixelCNN(rank, 5).double()
    with torch.no_grad():
        # W' = W x_c U: the first convolution's weights expressed in the basis
        compressed.hidden.weight.copy_(torch.einsum("kchw,cr->krhw", full.hidden.weight, basis))
        compressed.hidden.bias.copy_(full.hidden.bias)
        compressed.score.load_state_dict(full.score.state_dict())
        assert torch.allclose(full(pixels), compressed(z), atol=1e-10)


def test_basis_is_orthonormal_and_error_shrinks_with_rank() -> None:
    pixels = _pixels(n=20, size=6)  # NC = 60, HW = 36: rank <= 36
    errors = []
    for rank in (2, 8, 20, 36):
        basis = channel_basis(pixels, rank)
        assert torch.allclose(basis.T @ basis, torch.eye(rank, dtype=basis.dtype), atol=1e-8)
        restored = (basis @ compress_pixels(pixels, basis).reshape(rank, -1)).reshape(pixels.shape)
        errors.append(float((restored - pixels).norm() / pixels.norm()))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-10  # full rank reproduces P exactly
    assert errors[0] > 1e-3


def test_compressed_model_trains_and_counts_its_parameters() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 2
    images = torch.randn(24, 3, 16, 16, generator=g) * 0.1
    images[labels == 1, :, 4:8, 4:8] += 2.0
    train, val = LabelledImages(images, labels), LabelledImages(images[:8].clone(), labels[:8].clone())
    mp = ModelParams(backbone="small_cnn", attention="global_pixel", K=4, pixel_rank=6)
    tp = TrainParams(epochs=2, cutoff_epoch=1, lr=0.01, batch_size=8, device="cpu")
    result = fit(mp, tp, train, val, class_names=["a", "b"], progress=False)
    assert result.spec.n_pixel_channels == 6 and result.spec.pixel_rank == 6
    counted = sum(p.numel() for p in result.model.pixel_cnn.parameters())
    assert counted == PixelCNN.expected_parameter_count(6, 4) == 4 * (9 * 6 + 1) + 5
    assert bool(result.model.is_frozen)
    # a rank above what P can have is capped at P's maximal rank
    capped = fit(ModelParams(attention="global_pixel", K=2, pixel_rank=10_000), tp, train, val,
                 class_names=["a", "b"], progress=False)
    assert capped.spec.n_pixel_channels == max_pixel_rank(24 * 3, 16, 16)


def test_negative_rank_is_a_param_error(tmp_path) -> None:
    from medattn.config import load_params
    from medattn.errors import ParamError

    path = tmp_path / "params.yaml"
    path.write_text("model:\n  pixel_rank: -1\n")
    with pytest.raises(ParamError, match="model.pixel_rank"):
        load_params(path)
