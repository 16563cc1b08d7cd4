"""Predictions with attention maps: a model bundle -> probabilities + map -> the JSON the service returns.

Three pieces, so the HTTP service and an in-process caller (tests, the benchmark) run the same
code:

- :class:`Predictor` holds one loaded model and its spec. ``predict(images)`` pre-processes
  RGB images exactly as training did (:func:`medattn.data.preprocess.to_model_input`, with the
  image size, mean and std saved in the bundle's spec), runs one batched forward pass and
  returns a :class:`RawPrediction` per image: probabilities and the attention map at the model's
  resolution, tagged with the model version that made them.
- :func:`build_payload` turns a raw prediction into the response body: label, probabilities,
  model name and version, request id, and the attention map colour-mapped to a base64 PNG at the
  *uploaded image's* resolution (the map is upsampled bilinearly), plus the raw map at *model*
  resolution when asked for.
- :class:`ChampionSlot` keeps the predictor of the version the registry alias ``champion``
  points to and swaps in a new one, without a restart, when the alias has moved.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from medattn.data.preprocess import to_model_input
from medattn.devices import resolve_device
from medattn.errors import ModelError, first_line
from medattn.models.bundle import load_bundle
from medattn.models.factory import ModelSpec

log = logging.getLogger(__name__)
CHAMPION_ALIAS = "champion"
# zlib level 1: the attention PNG of a large image encodes several times faster than at the
# default level 6 and is only slightly bigger.
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class ModelRef:
    """Which registered model version made a prediction."""

    name: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class RawPrediction:
    """One image's model output: ``probabilities`` (C,), ``attention`` (h, w) in [0, 1]."""

    probabilities: np.ndarray
    attention: np.ndarray
    class_names: tuple[str, ...]
    model: ModelRef

    @property
    def label(self) -> str:
        return self.class_names[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        return float(np.max(self.probabilities))

    def to_wire(self) -> dict[str, Any]:
        """Plain types + arrays: what the model-runner service sends back to the API service."""
        return {"probabilities": self.probabilities, "attention": self.attention,
                "class_names": list(self.class_names), "model": self.model.to_dict()}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> "RawPrediction":
        return cls(probabilities=np.asarray(raw["probabilities"], dtype=np.float64),
                   attention=np.asarray(raw["attention"], dtype=np.float32),
                   class_names=tuple(raw["class_names"]), model=ModelRef(**raw["model"]))


class Predictor:
    """One loaded model: RGB images in, :class:`RawPrediction` out."""

    def __init__(self, model: nn.Module, spec: ModelSpec, ref: ModelRef, device: str = "cpu") -> None:
        if spec.in_channels != 3:
            raise ModelError(f"model {ref.name} v{ref.version} takes {spec.in_channels} channels; "
                             "the service feeds RGB (3 channels)")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.ref = ref
        names = tuple(spec.class_names) or tuple(str(i) for i in range(spec.num_classes))
        if len(names) != spec.num_classes:
            raise ModelError(f"model {ref.name} v{ref.version}: {len(names)} class names for "
                             f"{spec.num_classes} classes")
        self.class_names = names

    @classmethod
    def from_bundle(cls, bundle_dir: Path, ref: ModelRef, device: str = "cpu") -> "Predictor":
        model, spec = load_bundle(bundle_dir, "cpu")
        return cls(model, spec, ref, device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Any PIL image -> the normalised (3, S, S) tensor training fed the model."""
        return to_model_input(image, self.spec.image_size, self.spec.mean, self.spec.std)

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image | np.ndarray]) -> list[RawPrediction]:
        """One forward pass over all ``images`` (PIL images or (H, W, 3) uint8 arrays)."""
        if not images:
            return []
        batch = torch.stack([self.preprocess(_as_pil(img)) for img in images]).to(self.device)
        logits, attention = self.model(batch)
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64)
        # A global map may come back as one (1, 1, h, w) map for the whole batch.
        maps = attention.float().expand(len(images), -1, -1, -1)[:, 0].clamp(0.0, 1.0).cpu().numpy()
        return [RawPrediction(probabilities=probabilities[i], attention=maps[i].astype(np.float32),
                              class_names=self.class_names, model=self.ref)
                for i in range(len(images))]


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    return Image.fromarray(array, mode="RGB")


def upsample_attention(attention: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of an (h, w) map to (height, width); values stay in [0, 1]."""
    att = np.asarray(attention, dtype=np.float32)
    if att.shape == (height, width):
        return att.copy()
    resized = Image.fromarray(att, mode="F").resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


@lru_cache(maxsize=1)
def _attention_palette() -> list[int]:
    """The 256 colours ``colorize_attention`` maps [0, 1] onto, as a flat PIL palette."""
    from medattn.evaluation.figures import colorize_attention  # late: pulls in matplotlib

    ramp = np.arange(256, dtype=np.float64)[None, :] / 255.0  # value i/255 -> colour index i
    return colorize_attention(ramp)[0].astype(np.uint8).ravel().tolist()


def attention_png(attention: np.ndarray, width: int, height: int) -> bytes:
    """The colour-mapped attention map as PNG bytes at width x height (the uploaded image's size).

    The colour map has 256 entries, so the PNG is a palette image: one byte per pixel instead of
    three, several times faster to compress and smaller, and it decodes (``.convert("RGB")``) to
    exactly the pixels of :func:`medattn.evaluation.figures.colorize_attention`.
    """
    full = upsample_attention(attention, width, height)
    indices = np.clip(np.rint(full.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(indices).tobytes())
    image.putpalette(_attention_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def build_payload(raw: RawPrediction, width: int, height: int, request_id: str,
                  include_raw_attention: bool = False) -> dict[str, Any]:
    """The JSON body of one prediction (see the module docstring for what is where)."""
    payload: dict[str, Any] = {
        "request_id": request_id,
        "label": raw.label,
        "probabilities": {name: float(p) for name, p in zip(raw.class_names, raw.probabilities, strict=True)},
        "model": raw.model.to_dict(),
        "image": {"width": width, "height": height},
        "attention_png": base64.b64encode(attention_png(raw.attention, width, height)).decode("ascii"),
    }
    if include_raw_attention:
        att_h, att_w = raw.attention.shape
        # Model resolution, not the upload's: these are the numbers the model produced.
        payload["attention"] = {"resolution": "model", "height": att_h, "width": att_w,
                                "values": np.round(raw.attention.astype(np.float64), 6).tolist()}
    return payload


@dataclass
class ChampionSlot:
    """The predictor of the registry's champion; :meth:`refresh` follows the alias when it moves.

    Swapping is a single reference assignment, so a prediction in flight keeps the predictor
    it started with and the next one gets the new model: no request sees a half-loaded model.
    """

    model_name: str
    tracking_uri: str
    cache_dir: Path
    device: str = "cpu"
    _current: Optional[Predictor] = field(default=None, init=False)
    # The version whose weights release() dropped: still "held", so refresh() does not load it again.
    _released: Optional[ModelRef] = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    last_error: Optional[str] = field(default=None, init=False)

    @property
    def current(self) -> Optional[Predictor]:
        return self._current

    @property
    def held(self) -> Optional[ModelRef]:
        """The champion version this slot follows, loaded or released."""
        return self._current.ref if self._current is not None else self._released

    def release(self) -> None:
        """Drop the loaded weights but remember the version (it is served elsewhere)."""
        with self._lock:
            if self._current is not None:
                self._released, self._current = self._current.ref, None

    def refresh(self, keep: Optional[Callable[[Predictor], bool]] = None) -> bool:
        """Load the champion if it is not the one held; True when the followed version changed.

        Registry and loading failures propagate (RegistryError / ModelError) and leave the
        current model serving; they are also kept in ``last_error`` for the status endpoint.
        ``keep`` sees a newly loaded predictor before anyone else: False releases its weights
        at once (the version is then served elsewhere, see :mod:`medattn.serving.placement`).
        """
        from medattn.registry import download_model_version, get_model_version_info

        with self._lock:  # one load at a time (the poller and POST /reload may race)
            try:
                info = get_model_version_info(self.model_name, CHAMPION_ALIAS, tracking_uri=self.tracking_uri)
                held = self.held
                if held is not None and held.version == info.version:
                    self.last_error = None
                    return False
                # By version number, not alias: the alias may move again while we download.
                bundle_dir, info = download_model_version(self.model_name, info.version, dst=self.cache_dir,
                                                          tracking_uri=self.tracking_uri)
                loaded = Predictor.from_bundle(bundle_dir, ModelRef(info.name, info.version), self.device)
                if keep is None or keep(loaded):
                    self._current, self._released = loaded, None
                else:
                    self._current, self._released = None, loaded.ref
            except Exception as exc:
                self.last_error = first_line(exc)
                raise
            self.last_error = None
            log.info("serving model %s version %s", info.name, info.version)
            return True
