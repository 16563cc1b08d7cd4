"""Seed 001's pixel CNN and Algorithm 1 (its hooks on the one training loop)."""

from __future__ import annotations

import pytest
import torch

from medattn.config import ModelParams, TrainParams
from medattn.models.base import LossSettings
from medattn.models.factory import ModelSpec, create_model
from medattn.models.global_attention import GlobalPixelAttention, PixelCNN, pixel_representation_from_images
from medattn.training.fit import LabelledImages, fit
from medattn.training.losses import total_loss


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
    spec = ModelSpec(backbone="small_cnn", attention="global_pixel", num_classes=2, image_size=4, K=1,
                     n_pixel_channels=3)
    terms = create_model(spec).loss_terms(m, LossSettings(lambda_l1=0.5))
    assert terms["attention_l1"].item() == pytest.approx(0.125)
    losses = total_loss(logits, labels, terms)
    assert losses["total"].item() == pytest.approx(losses["ce"].item() + 0.125)
    plain = total_loss(logits, labels, {})
    assert plain["total"].item() == pytest.approx(plain["ce"].item())


def _toy_data(n: int = 24, size: int = 16, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, size, size, generator=g) * 0.1
    images[labels == 1, :, 4:8, 4:8] += 2.0  # class 1 has a bright patch: learnable
    return LabelledImages(images, labels), LabelledImages(images[:8].clone(), labels[:8].clone())


def _params(epochs: int = 4, cutoff: int = 2, seed: int = 0) -> tuple[ModelParams, TrainParams]:
    return ModelParams(backbone="small_cnn", attention="global_pixel", K=4), TrainParams(
        epochs=epochs, cutoff_epoch=cutoff, lambda_l1=0.01, lr=0.01, batch_size=8, weight_decay=1e-4, seed=seed,
        device="cpu",
    )


def _fit(mp, tp, train, val, **kwargs):
    return fit(mp, tp, train, val, class_names=["a", "b"], progress=False, **kwargs)


def test_pixel_cnn_learns_before_cutoff_and_is_fixed_after(monkeypatch) -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=2, cutoff=1)
    snapshots: list[dict[str, torch.Tensor]] = []
    seen_model: dict = {}
    original = GlobalPixelAttention.before_training

    def spy(self, images):
        seen_model["m"] = self
        snapshots.append({k: v.clone() for k, v in self.pixel_cnn.state_dict().items()})
        return original(self, images)

    monkeypatch.setattr(GlobalPixelAttention, "before_training", spy)
    epochs_seen: list[dict[str, float]] = []

    def on_epoch(row: dict[str, float]) -> None:
        epochs_seen.append(row)
        snapshots.append({k: v.clone() for k, v in seen_model["m"].pixel_cnn.state_dict().items()})

    result = _fit(mp, tp, train, val, on_epoch=on_epoch)
    initial, after_e, after_last = snapshots
    assert any(not torch.equal(initial[k], after_e[k]) for k in initial), "pixel CNN must train up to E"
    assert all(torch.equal(after_e[k], after_last[k]) for k in after_e), "pixel CNN must be fixed after E"
    assert [r["pixel_cnn_frozen"] for r in epochs_seen] == [0.0, 1.0]
    assert bool(result.model.is_frozen)
    assert all(not p.requires_grad for p in result.model.pixel_cnn.parameters())


def test_pixel_representation_is_built_from_the_training_split_only(monkeypatch) -> None:
    train, val = _toy_data()
    val = LabelledImages(val.images + 100.0, val.labels)  # validation images are recognisably different
    attached: list[torch.Tensor] = []
    original = GlobalPixelAttention.set_pixel_representation

    def spy(self, pixels):
        attached.append(pixels.detach().clone())
        return original(self, pixels)

    monkeypatch.setattr(GlobalPixelAttention, "set_pixel_representation", spy)
    result = _fit(*_params(epochs=1, cutoff=1), train, val)
    assert attached, "P was never attached"
    assert torch.equal(attached[0], pixel_representation_from_images(train.images))
    assert result.spec.n_pixel_channels == len(train.labels) * 3


def test_training_is_deterministic_to_the_bit() -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=3, cutoff=1)
    a = _fit(mp, tp, train, val)
    b = _fit(mp, tp, train, val)
    assert a.history == b.history
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "two runs of the same data and params must give identical weights"


def test_interrupted_run_resumes_to_the_same_result(tmp_path) -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=4, cutoff=2)
    uninterrupted = _fit(mp, tp, train, val)

    class Killed(Exception):
        pass

    def kill_after_three(row: dict[str, float]) -> None:
        if row["epoch"] == 3:
            raise Killed

    with pytest.raises(Killed):
        _fit(mp, tp, train, val, checkpoint_dir=tmp_path, on_epoch=kill_after_three)
    resumed = _fit(mp, tp, train, val, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 3
    assert [r["epoch"] for r in resumed.history] == [1.0, 2.0, 3.0, 4.0]
    for got, want in zip(resumed.history, uninterrupted.history):
        assert got == pytest.approx(want)
    assert torch.allclose(resumed.model.frozen_map, uninterrupted.model.frozen_map)


def test_checkpoint_of_another_config_is_ignored(tmp_path) -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=2, cutoff=1)
    _fit(mp, tp, train, val, checkpoint_dir=tmp_path)
    _, other = _params(epochs=2, cutoff=1, seed=5)
    result = _fit(mp, other, train, val, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0


def test_best_epoch_before_the_cutoff_is_saved_frozen_at_that_epoch() -> None:
    train, val = _toy_data()
    mp, tp = _params(epochs=3, cutoff=2)
    rows: list[dict] = []
    result = _fit(mp, tp, train, val, on_epoch=lambda row: rows.append(row))
    assert bool(result.model.is_frozen)
    assert result.model.pixel_representation.numel() == 0  # P is not kept in the saved model
    assert result.best_epoch >= 1
