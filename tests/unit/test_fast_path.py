"""The fast training path: resolved per device, the same kind of result as the plain path on a toy task.

The CPU has no CUDA, so these tests force ``train.fast_path: on``: the splits are held on the
device (uint8 where the images are 8-bit pixels), bf16 autocast and channels_last all run here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from medattn.config import ModelParams, Params, TrainParams, validate_params
from medattn.data.preprocess import normalize_tensor
from medattn.errors import ParamError
from medattn.models.base import available_attentions
from medattn.models.global_attention import PixelCNN
from medattn.training.fast_path import PLAIN, DeviceSplit, resolve_fast_path
from medattn.training.fit import LabelledImages, TrainStep, fit

CPU = torch.device("cpu")


def _pixels(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit images: dark noise, class 1 with a bright square (what a fundus lesion is, roughly)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    pixels = torch.randint(0, 60, (n, 3, size, size), generator=g, dtype=torch.uint8)
    pixels[labels == 1, :, 3:8, 3:8] = 250
    return pixels, labels


def _toy(n_train: int = 32, n_val: int = 12) -> tuple[LabelledImages, LabelledImages]:
    tp, tl = _pixels(n_train, seed=0)
    vp, vl = _pixels(n_val, seed=1)
    return LabelledImages(normalize_tensor(tp), tl), LabelledImages(normalize_tensor(vp), vl)


def _train_params(fast_path: str, epochs: int = 5, cutoff: int = 2) -> TrainParams:
    return TrainParams(epochs=epochs, cutoff_epoch=cutoff, lambda_l1=0.01, lr=0.01, batch_size=8, seed=0,
                       device="cpu", fast_path=fast_path)


def test_auto_is_off_on_the_cpu_and_on_forces_every_part() -> None:
    assert resolve_fast_path("auto", CPU) == PLAIN
    assert resolve_fast_path("off", CPU) == PLAIN
    forced = resolve_fast_path("on", CPU)
    assert forced.enabled and forced.channels_last and forced.autocast_dtype == torch.bfloat16
    assert not forced.compile_image_cnn


def test_compile_needs_cuda_and_falls_back_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="medattn.training.fast_path"):
        resolved = resolve_fast_path("compile", CPU)
    assert resolved.enabled and not resolved.compile_image_cnn
    assert "compile needs CUDA" in caplog.text


def test_an_unknown_setting_is_a_param_error() -> None:
    with pytest.raises(ParamError, match="train.fast_path must be one of auto, on, off, compile, got 'fast'"):
        resolve_fast_path("fast", CPU)
    with pytest.raises(ParamError, match="train.fast_path"):
        validate_params(Params(train=TrainParams(fast_path="yes")))


def test_device_split_keeps_8_bit_images_as_uint8_and_normalises_them_identically() -> None:
    pixels, labels = _pixels(10)
    normalised = normalize_tensor(pixels)
    split = DeviceSplit(normalised, labels, CPU, channels_last=True)
    assert split.stored_as_uint8 and split.images.dtype == torch.uint8
    assert torch.equal(split.images, pixels)
    idx = torch.tensor([7, 2, 2, 0])
    x, y = split.batch(idx)
    assert torch.equal(x, normalised[idx]) and torch.equal(y, labels[idx])
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_device_split_keeps_other_images_as_float() -> None:
    images = torch.randn(6, 3, 8, 8)
    split = DeviceSplit(images, torch.zeros(6, dtype=torch.long), CPU, channels_last=False)
    assert not split.stored_as_uint8
    x, _ = split.batch(torch.tensor([5, 1]))
    assert torch.equal(x, images[[5, 1]])
    one_channel = DeviceSplit(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), CPU, channels_last=False)
    assert not one_channel.stored_as_uint8  # ImageNet statistics are for 3 channels only


@pytest.mark.parametrize("attention", available_attentions())
def test_the_fast_path_learns_the_toy_task_with_the_same_history_columns(attention: str) -> None:
    train, val = _toy()
    mp = ModelParams(backbone="small_cnn", attention=attention, K=4)
    fast = fit(mp, _train_params("on", epochs=4), train, val, class_names=["a", "b"], progress=False)
    plain = fit(mp, _train_params("off", epochs=1), train, val, class_names=["a", "b"], progress=False)
    assert all(set(row) == set(plain.history[0]) for row in fast.history)
    first, last = fast.history[0], fast.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert fast.best_row["val_acc"] >= 0.9
    # a trained model is handed on (saved, served) in the default memory layout
    assert all(p.is_contiguous() for p in fast.model.parameters())
    logits, _ = fast.model(val.images)
    assert (logits.argmax(1) == val.labels).float().mean() >= 0.9


def test_after_the_cutoff_the_frozen_map_is_one_multiply(monkeypatch) -> None:
    train, val = _toy()
    calls: list[bool] = []
    original = PixelCNN.forward

    def counting(self, pixels):
        calls.append(True)
        return original(self, pixels)

    monkeypatch.setattr(PixelCNN, "forward", counting)
    per_epoch: list[int] = []

    def note_calls(row: dict[str, float]) -> None:
        per_epoch.append(len(calls))
        calls.clear()

    mp = ModelParams(backbone="small_cnn", attention="global_pixel", K=4)
    fit(mp, _train_params("on", epochs=4, cutoff=2), train, val, class_names=["a", "b"], on_epoch=note_calls,
        progress=False)
    steps_per_epoch = len(train.labels) // 8
    assert per_epoch[0] >= steps_per_epoch  # joint phase: the pixel CNN runs every step
    # epoch 3 computes M once when it freezes; after that nothing runs the pixel CNN again
    assert per_epoch[2] <= 1 and per_epoch[3] == 0


def test_extra_loss_and_stopping_work_on_the_fast_path() -> None:
    train, val = _toy()
    steps: list[TrainStep] = []

    def extra(model, step: TrainStep) -> dict[str, torch.Tensor]:
        steps.append(step)
        return {"feedback": 2.0 * step.attention.float().mean()}

    result = fit(ModelParams(backbone="small_cnn", attention="global_pixel", K=4), _train_params("on", epochs=4),
                 train, val, class_names=["a", "b"], extra_loss=extra, on_epoch=lambda row: row["epoch"] >= 2,
                 progress=False)
    assert result.stopped_early and len(result.history) == 2
    assert result.history[0]["train_feedback"] > 0
    # the batch extra_loss sees is the training images it names, normalised on the device
    assert torch.equal(steps[0].images, train.images[steps[0].indices])
