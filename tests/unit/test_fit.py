"""The one training entry point: on_epoch may stop, init_from fine-tunes, extra_loss adds terms.

Run over every registered method, so search, protocol and recalibration can train any of them.
"""

from __future__ import annotations

import pytest
import torch

from medattn.config import ModelParams, TrainParams
from medattn.errors import ModelError
from medattn.models.base import available_attentions
from medattn.models.bundle import save_bundle
from medattn.training.fit import LabelledImages, TrainStep, fit


def _data(n: int = 16, size: int = 16) -> tuple[LabelledImages, LabelledImages]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, size, size, generator=g) * 0.1
    images[labels == 1, :, 2:6, 2:6] += 2.0
    return LabelledImages(images, labels), LabelledImages(images[:6].clone(), labels[:6].clone())


def _params(attention: str, epochs: int = 2) -> tuple[ModelParams, TrainParams]:
    return ModelParams(backbone="small_cnn", attention=attention, K=2), TrainParams(
        epochs=epochs, cutoff_epoch=1, lambda_l1=0.01, lr=0.01, batch_size=8, seed=0, device="cpu")


@pytest.mark.parametrize("attention", available_attentions())
def test_every_method_trains_and_on_epoch_can_stop(attention: str) -> None:
    train, val = _data()
    mp, tp = _params(attention, epochs=4)
    seen: list[float] = []

    def stop_after_two(row: dict[str, float]) -> bool:
        seen.append(row["epoch"])
        return row["epoch"] >= 2

    result = fit(mp, tp, train, val, class_names=["a", "b"], on_epoch=stop_after_two, progress=False)
    assert seen == [1.0, 2.0]
    assert result.stopped_early and len(result.history) == 2
    assert {"train_loss", "train_ce", "val_macro_f1"} <= set(result.history[0])
    logits, attention_map = result.model(val.images)
    assert logits.shape == (6, 2) and attention_map.shape == (6, 1, 16, 16)


@pytest.mark.parametrize("attention", available_attentions())
def test_extra_loss_is_added_and_sees_the_batch(attention: str) -> None:
    train, val = _data()
    mp, tp = _params(attention, epochs=1)
    steps: list[TrainStep] = []

    def extra(model, step: TrainStep) -> dict[str, torch.Tensor]:
        steps.append(step)
        assert torch.equal(step.images, train.images[step.indices])
        return {"feedback": 3.0 * step.attention.mean()}

    result = fit(mp, tp, train, val, class_names=["a", "b"], extra_loss=extra, progress=False)
    assert sorted(torch.cat([s.indices for s in steps]).tolist()) == list(range(len(train.labels)))
    row = result.history[0]
    assert row["train_feedback"] > 0
    # the total is CE + the method's terms + the extra term
    method_terms = sum(v for k, v in row.items() if k.startswith("train_") and k not in
                       ("train_loss", "train_acc", "train_ce", "train_feedback"))
    assert row["train_loss"] == pytest.approx(row["train_ce"] + row["train_feedback"] + method_terms, rel=1e-5)


def test_init_from_a_bundle_fine_tunes_its_weights(tmp_path) -> None:
    train, val = _data()
    mp, tp = _params("global_pixel", epochs=2)
    first = fit(mp, tp, train, val, class_names=["a", "b"], progress=False)
    save_bundle(first.model, first.spec, tmp_path / "champion")
    # more training images than the champion saw: its frozen map is kept, not rebuilt
    bigger = LabelledImages(torch.cat([train.images, train.images[:4]]), torch.cat([train.labels, train.labels[:4]]))
    tuned = fit(mp, TrainParams(epochs=1, cutoff_epoch=0, lr=1e-3, batch_size=8, device="cpu"), bigger, val,
                class_names=["a", "b"], init_from=tmp_path / "champion", progress=False)
    assert torch.equal(tuned.model.frozen_map, first.model.frozen_map)
    assert tuned.spec == first.spec
    start = first.model.image_cnn.head[1].weight
    assert not torch.equal(tuned.model.image_cnn.head[1].weight, start)  # it trained
    assert torch.allclose(tuned.model.image_cnn.head[1].weight, start, atol=0.2)  # from the champion's weights


def test_init_from_with_other_classes_is_a_clear_error(tmp_path) -> None:
    train, val = _data()
    mp, tp = _params("none", epochs=1)
    first = fit(mp, tp, train, val, class_names=["a", "b"], progress=False)
    save_bundle(first.model, first.spec, tmp_path / "champion")
    with pytest.raises(ModelError, match="classes"):
        fit(mp, tp, train, val, class_names=["x", "y"], init_from=tmp_path / "champion", progress=False)
    with pytest.raises(ModelError, match="do not fit"):
        fit(ModelParams(backbone="small_cnn", attention="mldam"), tp, train, val, class_names=["a", "b"],
            init_from={"nope": torch.zeros(1)}, progress=False)
