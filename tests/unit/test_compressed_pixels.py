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


def _first_scores(rank: int, images: torch.Tensor, seed: int) -> torch.Tensor:
    from medattn.models.global_attention import GlobalPixelAttention

    n, c, size, _ = images.shape
    torch.manual_seed(seed)
    model = GlobalPixelAttention(torch.nn.Identity(), rank or n * c, 8, size, pixel_rank=rank)
    model.before_training(images)
    with torch.no_grad():
        return model.pixel_cnn.hidden(model.pixel_representation)


def test_a_fresh_compressed_model_starts_at_the_scale_of_the_uncompressed_one() -> None:
    # NC = 240 channels, R = 15: with PyTorch's fan-in init alone the compressed first layer
    # started sqrt(240 / 15) = 4x larger (and some seeds collapsed, BENCHMARKS "Pixel-rank sweep")
    images = torch.rand(80, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    ratios = [float(_first_scores(15, images, s).std() / _first_scores(0, images, s).std()) for s in range(4)]
    assert 0.6 < sum(ratios) / len(ratios) < 1.6, ratios


def test_loaded_weights_are_never_rescaled() -> None:
    from medattn.models.global_attention import GlobalPixelAttention

    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    trained = GlobalPixelAttention(torch.nn.Identity(), 6, 4, 8, pixel_rank=6)
    restored = GlobalPixelAttention(torch.nn.Identity(), 6, 4, 8, pixel_rank=6)
    restored.load_state_dict(trained.state_dict())
    restored.before_training(images)  # fine-tuning from a saved model: its weights as saved
    assert torch.equal(restored.pixel_cnn.hidden.weight, trained.pixel_cnn.hidden.weight)
    trained.before_training(images)  # fresh: scaled once, by sqrt(6 / 60)
    assert torch.allclose(trained.pixel_cnn.hidden.weight, restored.pixel_cnn.hidden.weight * (6 / 60) ** 0.5)
