"""The MLflow pyfunc face of a trained bundle, so the registry holds a real, loadable MLflow model.

The bundle directory (``model.pt`` + ``model_spec.json``) is stored unchanged as the model's
artifact ``bundle``; loading goes through ``medattn.models.bundle.load_bundle``, imported only
when a model is actually loaded (torch and the model code stay out of registry imports).
The model is logged "from code" (:mod:`medattn.registry.pyfunc_entry`) rather than pickled,
and carries a copy of the ``medattn`` package plus exact pins of what that code imports, so
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need nothing from this repository.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from medattn.errors import ModelError

BUNDLE_ARTIFACT = "bundle"
BUNDLE_FILES = ("model.pt", "model_spec.json")
ENTRY_SCRIPT = Path(__file__).with_name("pyfunc_entry.py")


class MedattnPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(images) -> class probabilities (B, n_classes)``, float32.

    ``images``: (B, 3, S, S) or one (3, S, S) float32 array in [0, 1], S = the bundle's
    ``image_size``; standardised here with the bundle's mean/std exactly as in training.
    """

    def load_context(self, context: Any) -> None:
        from medattn.models.bundle import load_bundle  # late: torch + model code

        self._model, self._spec = load_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]), "cpu")

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch

        from medattn.data.preprocess import normalize_tensor

        batch = as_image_batch(model_input)
        size = self._spec.image_size
        if batch.shape[1:] != (self._spec.in_channels, size, size):
            raise ModelError(
                f"predict: images must have shape (B, {self._spec.in_channels}, {size}, {size}), got {batch.shape}"
            )
        images = normalize_tensor(torch.from_numpy(batch), self._spec.mean, self._spec.std)
        with torch.no_grad():
            logits, _attention = self._model(images)  # the one model contract: (logits, attention)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()


def as_image_batch(model_input: Any) -> np.ndarray:
    """A (B, C, H, W) float32 array from an array, one (C, H, W) image, or a one-column DataFrame of images."""
    if hasattr(model_input, "columns"):  # pandas DataFrame: one image (nested array) per row
        if len(model_input.columns) != 1:
            raise ModelError(
                f"predict: a DataFrame input needs exactly one column of images, got {list(model_input.columns)}"
            )
        model_input = np.stack([np.asarray(v, dtype=np.float32) for v in model_input.iloc[:, 0]])
    batch = np.asarray(model_input, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4:
        raise ModelError(f"predict: images must have shape (B, C, H, W) or (C, H, W), got {batch.shape}")
    return np.ascontiguousarray(batch)


def model_signature():
    """Float32 images in, float32 probabilities out; sizes vary with params.yaml, so all -1."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
    )


# The distributions the pyfunc itself imports when it loads and predicts (through the medattn
# code it carries: ``medattn.models`` and ``medattn.data.preprocess``); everything else they
# need, pillow through torchvision for instance, is their own dependency.
RUNTIME_DISTRIBUTIONS = ("mlflow", "torch", "torchvision", "numpy")


def pip_requirements() -> list[str]:
    """Exact pins, from this environment, of :data:`RUNTIME_DISTRIBUTIONS`.

    ``medattn`` is deliberately absent: it is on no package index, and the model carries its
    own copy of the package (:func:`code_paths`), so an environment built from these pins
    (``mlflow models serve --env-manager virtualenv``, ``mlflow models build-docker``) has
    everything the model runs. Stating them also skips MLflow's slow requirement inference.
    """
    return [f"{dist}=={metadata.version(dist)}" for dist in RUNTIME_DISTRIBUTIONS]


def code_paths() -> list[str]:
    """The ``medattn`` package that logs the model, copied into it (MLflow's ``code/`` folder).

    MLflow puts that folder first on ``sys.path`` when it loads the model, so in a fresh
    process (``mlflow models serve``) the model runs the code it was logged with, whatever
    version of the project is installed, or none; a process that has already imported
    ``medattn`` keeps its own.
    """
    import medattn

    return [str(Path(medattn.__file__).parent)]


def check_bundle_dir(bundle_dir: Path) -> None:
    if not bundle_dir.is_dir():
        raise ModelError(f"model bundle {bundle_dir}: no such directory")
    missing = [name for name in BUNDLE_FILES if not (bundle_dir / name).is_file()]
    if missing:
        raise ModelError(f"model bundle {bundle_dir}: missing {', '.join(missing)}")
