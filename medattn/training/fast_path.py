"""The fast training path (``train.fast_path``): what ``fit`` changes when it is on.

``auto`` (the default) turns it on where training runs on CUDA and leaves the CPU on the plain
path, whose weights are bit-exact from run to run. ``on`` forces it on any device (the CPU
tests use that), ``off`` never, ``compile`` is ``on`` plus ``torch.compile`` of the image CNN.

When it is on:

* **the splits live on the device** (:class:`DeviceSplit`), as uint8 pixels when the
  normalised images are exactly ImageNet-normalised 8-bit pixels (what ``prepare`` writes), so a
  5,000-image 224 px set is 750 MB of GPU memory instead of 3 GB, and each batch is gathered and
  normalised on the device: no host → device copy per step;
* **bf16 autocast** for the forward pass and the loss (the weights and Adam stay float32);
* **channels_last** memory layout for the model and every batch (what cuDNN's fastest
  convolutions read);
* the per-step loss sums stay on the device and are read once per epoch, so the host never
  waits for the GPU inside an epoch (which also lets packed trials overlap, see
  :mod:`medattn.training.packing`);
* ``compile``: the image CNN is compiled in place (``nn.Module.compile``, which keeps the
  state-dict keys, so checkpoints and bundles load either way). CUDA only: on the CPU the
  inductor build of each backbone takes longer than a demo's whole training, so it is skipped
  with a warning. It is not part of ``auto`` because its first epochs pay the compilation.

Augmentation stays what the plain path does (none): seed 001's global map needs every image
aligned (right eyes are flipped at ``prepare`` so that optic discs coincide), so flips or crops
would blur the one map M the method learns.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch

from medattn.config import FAST_PATH_CHOICES
from medattn.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from medattn.errors import ParamError

log = logging.getLogger(__name__)

# A normalised image is taken to be 8-bit pixels when re-normalising its rounded pixels gives it
# back to within float32 rounding of the normalisation (|x| <= ~2.7, so a few ulps).
_QUANTISATION_TOLERANCE = 1e-5
_CHUNK = 256  # images per chunk when checking / converting a split (bounded host memory)


@dataclass(frozen=True)
class FastPath:
    """The resolved setting: which of the fast path's parts are on for this run."""

    enabled: bool = False
    autocast_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    compile_image_cnn: bool = False

    def autocast(self, device: torch.device) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


PLAIN = FastPath()


def resolve_fast_path(setting: str, device: torch.device) -> FastPath:
    """``train.fast_path`` on this device -> :class:`FastPath`."""
    if setting not in FAST_PATH_CHOICES:
        raise ParamError(f"train.fast_path must be one of {', '.join(FAST_PATH_CHOICES)}, got {setting!r}")
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return PLAIN
    compile_cnn = setting == "compile"
    if compile_cnn and device.type != "cuda":
        log.warning("train.fast_path: compile needs CUDA; on %s the image CNN runs uncompiled", device)
        compile_cnn = False
    return FastPath(enabled=True, autocast_dtype=torch.bfloat16, channels_last=True,
                    compile_image_cnn=compile_cnn)


def prepare_model(model: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """Lay the (already placed) model out for the fast path; a no-op for the plain path."""
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    if fast.compile_image_cnn:
        model.image_cnn.compile()  # in place: the state dict keeps its keys
    return model


def _normalisation(channels: int, device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if channels != len(IMAGENET_MEAN):
        return None
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _as_pixels(images: torch.Tensor) -> Optional[torch.Tensor]:
    """The uint8 pixels whose ImageNet normalisation ``images`` is, or None if it is not one."""
    norm = _normalisation(images.shape[1], images.device)
    if norm is None or images.dtype != torch.float32:
        return None
    mean, std = norm
    chunks = []
    for chunk in images.split(_CHUNK):
        pixels = ((chunk * std + mean) * 255.0).round()
        if pixels.numel() and (pixels.min() < 0 or pixels.max() > 255):
            return None
        pixels = pixels.to(torch.uint8)
        back = (pixels.float() / 255.0 - mean) / std
        if pixels.numel() and float((back - chunk).abs().max()) > _QUANTISATION_TOLERANCE:
            return None
        chunks.append(pixels)
    return torch.cat(chunks) if chunks else images.new_empty(images.shape, dtype=torch.uint8)


class DeviceSplit:
    """A split held on the training device; ``batch(indices)`` gathers and normalises there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
        pixels = _as_pixels(images)
        self.stored_as_uint8 = pixels is not None
        stored = pixels if pixels is not None else images.float()
        self.images = stored.to(device)
        self.labels = labels.to(device)
        self.device = device
        self.channels_last = channels_last
        norm = _normalisation(images.shape[1], device)
        self._mean, self._std = norm if norm is not None else (None, None)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to(self.device, non_blocking=True)
        x = self.images.index_select(0, idx)
        if self.stored_as_uint8:
            x = (x.float() / 255.0 - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels.index_select(0, idx)


__all__ = ["FAST_PATH_CHOICES", "DeviceSplit", "FastPath", "PLAIN", "prepare_model", "resolve_fast_path"]
