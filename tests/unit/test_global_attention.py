"""Seed 001's pixel CNN and Algorithm 1."""

from __future__ import annotations

import pytest
import torch

from medattn.config import ModelParams, TrainParams
from medattn.models.global_attention import PixelCNN, pixel_representation_from_images
from medattn.training.algorithm1 import LabelledImages, train_algorithm1
from medattn.training.losses import attention_classification_loss


@pytest.mark.parametrize("nc,k", [(3, 1), (30, 8), (1200, 32)])
def test_pixel_cnn_parameter_count(nc: int, k: int) -> None:
    cnn = PixelCNN(nc, k)
    counted = sum(p.numel() for p in cnn.parameters())
    assert counted == k * (9 * nc + 1) + (k + 1) == PixelCNN.expected_parameter_count(nc, k)


def test_pixel_representation_stacks_images_as_channels() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = pixel_representation_from_images(images)
    assert p.shape == (1, 6, 4, 4)
    # pixel (i, j)'s feature vector is every image's channels at (i, j)
    assert torch.equal(p[0, :, 1, 2], images[:, :, 1, 2].reshape(-1))


def test_loss_terms_add_up_and_l1_is_pixel_mean() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    m = torch.full((1, 1, 4, 4), 0.25).expand(2, 1, 4, 4)
    terms = attention_classification_loss(logits, labels, m, lambda_l1=0.5, l1_on_attention=True)
    assert terms.attention_l1.item() == pytest.approx(0.25)
    assert terms.total.item() == pytest.approx(terms.cross_entropy.item() + 0.125)
    off = attention_classification_loss(logits, labels, m, lambda_l1=0.5, l1_on_attention=False)
    assert off.total.item() == pytest.approx(off.cross_entropy.item())


def _toy_data(n: int = 24, size: int = 16, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, size, size, generator=g) * 0.1
    images[labels == 1, :, 4:8, 4:8] += 2.0  # class 1 has a bright patch: learnable
    return LabelledImages(images, labels), LabelledImages(images[:8].clone(), labels[:8].clone())


def _params(epochs: int = 4, cutoff: int = 2, seed: int = 0) -> tuple[ModelParams, TrainParams]:
    return ModelParams(backbone="small_cnn", attention="global_pixel", K=4), TrainParams(
        epochs=epochs, cutoff_epoch=cutoff, lambda_l1=0.01, lr=0.01, batch_size=8, weight_decay=1e-4, seed=seed
    )


def test_pixel_cnn_learns_before_cutoff_and_is_fixed_after() -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=2, cutoff=1)
    snapshots: list[dict[str, torch.Tensor]] = []
    model_ref: dict = {}

    from medattn.training import algorithm1

    original = algorithm1.create_model

    def spy(spec, weights=None):
        model_ref["m"] = original(spec, weights)
        snapshots.append({k: v.clone() for k, v in model_ref["m"].pixel_cnn.state_dict().items()})
        return model_ref["m"]

    algorithm1.create_model = spy
    try:
        epochs_seen: list[dict[str, float]] = []

        def on_epoch(row: dict[str, float]) -> None:
            epochs_seen.append(row)
            snapshots.append({k: v.clone() for k, v in model_ref["m"].pixel_cnn.state_dict().items()})

        result = train_algorithm1(mp, tp, ["a", "b"], train, val, on_epoch=on_epoch, progress=False)
    finally:
        algorithm1.create_model = original
    initial, after_e, after_last = snapshots
    assert any(not torch.equal(initial[k], after_e[k]) for k in initial), "pixel CNN must train up to E"
    assert all(torch.equal(after_e[k], after_last[k]) for k in after_e), "pixel CNN must be fixed after E"
    assert [r["pixel_cnn_frozen"] for r in epochs_seen] == [0.0, 1.0]
    assert bool(result.model.is_frozen)
    assert all(not p.requires_grad for p in result.model.pixel_cnn.parameters())


def test_training_is_seeded() -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=2, cutoff=1)
    a = train_algorithm1(mp, tp, ["a", "b"], train, val, progress=False)
    b = train_algorithm1(mp, tp, ["a", "b"], train, val, progress=False)
    assert a.history == b.history
    assert torch.equal(a.model.frozen_map, b.model.frozen_map)


def test_interrupted_run_resumes_to_the_same_result(tmp_path) -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=4, cutoff=2)
    uninterrupted = train_algorithm1(mp, tp, ["a", "b"], train, val, progress=False)

    class Killed(Exception):
        pass

    def kill_after_three(row: dict[str, float]) -> None:
        if row["epoch"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train_algorithm1(mp, tp, ["a", "b"], train, val, checkpoint_dir=tmp_path, on_epoch=kill_after_three,
                         progress=False)
    resumed = train_algorithm1(mp, tp, ["a", "b"], train, val, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_epoch == 3
    assert [r["epoch"] for r in resumed.history] == [1.0, 2.0, 3.0, 4.0]
    for got, want in zip(resumed.history, uninterrupted.history):
        assert got == pytest.approx(want)
    assert torch.allclose(resumed.model.frozen_map, uninterrupted.model.frozen_map)


def test_checkpoint_of_another_config_is_ignored(tmp_path) -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=2, cutoff=1)
    train_algorithm1(mp, tp, ["a", "b"], train, val, checkpoint_dir=tmp_path, progress=False)
    _, other = _params(epochs=2, cutoff=1, seed=5)
    result = train_algorithm1(mp, other, ["a", "b"], train, val, checkpoint_dir=tmp_path, progress=False)
    assert result.resumed_from_epoch == 0
