"""Seed 001's global map per step: no device sync for the frozen flag, M cached between optimiser
steps when no gradient is wanted, and a deterministic basis for the compressed P (issue 10, item 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medattn.models.factory import ModelSpec, create_model
from medattn.models.global_attention import GlobalPixelAttention, channel_basis, pixel_representation_from_images
from medattn.training.feedback_loss import thawed_state
from medattn.training.fit import LabelledImages, evaluate_split

SIZE = 16


class _Tripwire(torch.Tensor):
    """A flag tensor whose value must not be read on the host (bool / item / tolist would sync on CUDA)."""

    reads = 0

    def __bool__(self) -> bool:
        _Tripwire.reads += 1
        return bool(self.as_subclass(torch.Tensor))

    def item(self):  # type: ignore[override]
        _Tripwire.reads += 1
        return self.as_subclass(torch.Tensor).item()

    def tolist(self):  # type: ignore[override]
        _Tripwire.reads += 1
        return self.as_subclass(torch.Tensor).tolist()


def _model(pixel_rank: int = 0, n_images: int = 6) -> tuple[GlobalPixelAttention, torch.Tensor]:
    images = torch.rand(n_images, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    spec = ModelSpec(backbone="small_cnn", attention="global_pixel", num_classes=2, image_size=SIZE, K=3,
                     n_pixel_channels=n_images * 3 if pixel_rank == 0 else pixel_rank, pixel_rank=pixel_rank)
    model = create_model(spec)
    assert isinstance(model, GlobalPixelAttention)
    model.before_training(images)
    return model, images


def _count_pixel_cnn_calls(model: GlobalPixelAttention) -> list[int]:
    calls = [0]
    model.pixel_cnn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _arm_tripwire(model: GlobalPixelAttention) -> None:
    model.is_frozen = model.is_frozen.as_subclass(_Tripwire)
    _Tripwire.reads = 0


@pytest.mark.parametrize("frozen", [True, False])
def test_forward_and_training_step_never_read_the_flag_buffer(frozen: bool) -> None:
    model, _ = _model()
    if frozen:
        model.freeze()
    _arm_tripwire(model)
    x = torch.rand(4, 3, SIZE, SIZE)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        logits, attention = model(x)
        logits.sum().backward()
        optimizer.step()
    with torch.no_grad():
        model(x)
        model.attention_map()
    model.epoch_metrics()
    assert _Tripwire.reads == 0
    # the tripwire itself works: the old code's bool(self.is_frozen) would have counted here
    bool(model.is_frozen)
    assert _Tripwire.reads == 1


def test_the_mirror_follows_freeze_and_every_kind_of_load() -> None:
    model, _ = _model()
    assert not model._frozen and model.epoch_metrics()["pixel_cnn_frozen"] == 0.0
    model.freeze()
    assert model._frozen and bool(model.is_frozen) and model.epoch_metrics()["pixel_cnn_frozen"] == 1.0
    saved = model.state_dict()

    fresh, _ = _model()
    fresh.load_state_dict(saved)
    assert fresh._frozen and not any(p.requires_grad for p in fresh.pixel_cnn.parameters())
    assert torch.equal(fresh.attention_map(), model.frozen_map)

    fresh.load_state_dict(thawed_state(saved))  # recalibration: an unfrozen state again
    assert not fresh._frozen and all(p.requires_grad for p in fresh.pixel_cnn.parameters())

    # loaded as part of a larger module, only _load_from_state_dict of the submodule runs
    wrapper = nn.ModuleDict({"inner": _model()[0]})
    wrapper.load_state_dict({f"inner.{k}": v for k, v in saved.items()})
    assert wrapper["inner"]._frozen

    twin = copy.deepcopy(model)
    assert twin._frozen and bool(twin.is_frozen)


def test_cached_map_equals_a_recomputed_one_and_is_computed_once_per_weights() -> None:
    model, _ = _model(pixel_rank=5)
    calls = _count_pixel_cnn_calls(model)
    x = torch.rand(3, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        first = model.attention_map().clone()
        for _ in range(4):
            _, attention = model(x)
    assert calls[0] == 1
    assert torch.equal(attention[0:1], first)
    recomputed = model.pixel_cnn(model.pixel_representation).detach()
    assert torch.equal(first, recomputed)


def test_map_is_recomputed_after_an_optimiser_step_a_load_and_new_pixels() -> None:
    model, images = _model()
    calls = _count_pixel_cnn_calls(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        before = model.attention_map().clone()
    logits, attention = model(torch.rand(4, 3, SIZE, SIZE))
    assert attention.requires_grad  # with autograd on, M is computed afresh and carries the graph
    (logits.sum() + attention.mean()).backward()
    optimizer.step()
    with torch.no_grad():
        after = model.attention_map()
        assert not torch.equal(after, before)
        assert torch.equal(after, model.pixel_cnn(model.pixel_representation))
    assert calls[0] == 4  # before, the training forward, after, and the check itself

    other, _ = _model()
    with torch.no_grad():
        for p in other.pixel_cnn.parameters():
            p.add_(0.3)
        model.load_state_dict(other.state_dict())
        loaded = model.attention_map()
        assert torch.equal(loaded, other.attention_map())

        model.set_pixel_representation(pixel_representation_from_images(images.flip(0)))
        assert not torch.equal(model.attention_map(), loaded)

        model.double()  # new storage and dtype: the float32 M must not come back
        assert model.attention_map().dtype == torch.float64


def test_validation_pass_runs_the_pixel_cnn_once_while_unfrozen() -> None:
    model, _ = _model(n_images=6)
    calls = _count_pixel_cnn_calls(model)
    val = LabelledImages(torch.rand(20, 3, SIZE, SIZE), torch.arange(20) % 2)
    evaluate_split(model, val, batch_size=4, device=torch.device("cpu"))  # 5 batches
    assert calls[0] == 1


def _low_rank_pixels(nc: int = 120, hw: int = 24, seed: int = 0) -> torch.Tensor:
    """Like stacked images: a few strong shared directions plus weaker per-image detail."""
    g = torch.Generator().manual_seed(seed)
    strong = torch.randn(nc, 6, generator=g) @ torch.randn(6, hw * hw, generator=g) * 5
    weak = torch.randn(nc, hw * hw, generator=g) * 0.2
    return (strong + weak).reshape(1, nc, hw, hw)


def test_randomised_basis_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    pixels = _low_rank_pixels()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = channel_basis(pixels, 16, exact_limit=0)
    assert torch.equal(torch.get_rng_state(), state)  # neither read nor advanced
    torch.manual_seed(12345)
    b = channel_basis(pixels, 16, exact_limit=0)
    assert torch.equal(a, b)
    assert a.dtype == pixels.dtype and a.shape == (120, 16)


def test_randomised_float32_basis_is_as_good_as_the_exact_one() -> None:
    pixels = _low_rank_pixels()
    matrix = pixels.reshape(120, -1).double()
    for rank in (4, 16, 40):
        exact = channel_basis(pixels.double(), rank).double()  # small P: the exact float64 SVD
        approx = channel_basis(pixels, rank, exact_limit=0).double()
        assert torch.allclose(approx.T @ approx, torch.eye(rank, dtype=torch.float64), atol=1e-5)

        def residual(u: torch.Tensor) -> float:
            return float((matrix - u @ (u.T @ matrix)).norm() / matrix.norm())

        # what the truncation leaves out: the randomised subspace loses at most 1 % more
        assert residual(approx) <= residual(exact) * 1.01 + 1e-6
    # the top directions themselves agree (up to sign, which both fix the same way)
    top_exact = channel_basis(pixels.double(), 4).double()
    top_approx = channel_basis(pixels, 4, exact_limit=0).double()
    assert torch.allclose(top_exact, top_approx, atol=1e-4)
