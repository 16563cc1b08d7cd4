"""A trained model on disk: ``model_spec.json`` (how to rebuild it) + ``model.pt`` (weights).

The same folder is a DVC output of the train stage, the artifact inside the MLflow registry,
and what the HTTP service loads, so there is one format and one loader. Weights are a plain
state dict (``weights_only`` loading: no pickled code runs when a model is opened).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from medattn.errors import ModelError
from medattn.models.factory import ModelSpec, create_model

SPEC_FILE = "model_spec.json"
WEIGHTS_FILE = "model.pt"


def save_bundle(model: nn.Module, spec: ModelSpec, out_dir: Path) -> Path:
    """Write the bundle atomically: a half-written bundle never replaces a good one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_spec(bundle_dir: Path) -> ModelSpec:
    path = Path(bundle_dir) / SPEC_FILE
    if not path.is_file():
        raise ModelError(f"not a model bundle (missing {SPEC_FILE}): {bundle_dir}")
    try:
        return ModelSpec.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"corrupt model spec {path}: {exc}") from exc


def load_bundle(bundle_dir: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from its spec and load its weights; returns it in eval mode."""
    spec = read_spec(bundle_dir)
    weights = Path(bundle_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"model bundle has no weights file: {weights}")
    model = create_model(spec)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelError(f"cannot load weights {weights}: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval(), spec
