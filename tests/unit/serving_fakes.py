"""Serving fakes shared by the unit tests: a tiny registered-model stand-in and the registry calls.

``registry`` (the fixture, re-exported by ``tests/unit/conftest.py``) replaces the two MLflow
registry calls a :class:`~medattn.serving.inference.ChampionSlot` makes with bundles in a folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medattn.errors import RegistryError
from medattn.models.bundle import save_bundle
from medattn.models.factory import ModelSpec, create_model
from medattn.registry import ModelVersionInfo

CLASSES = ("a", "b", "c")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    spec = ModelSpec(backbone="small_cnn", attention="global_pixel", num_classes=3, image_size=32,
                     class_names=CLASSES, n_pixel_channels=6, K=8)
    model = create_model(spec)
    model.set_pixel_representation(torch.rand(1, 6, 32, 32))
    model.freeze()
    return model.eval(), spec


class FakeRegistry:
    """The two registry calls ChampionSlot makes, over bundles saved in a folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.champion: str | None = None
        self.downloads: list[str] = []

    def add_version(self, version: str, seed: int) -> None:
        model, spec = tiny_model(seed)
        save_bundle(model, spec, self.root / f"v{version}")

    def info(self, name: str, alias_or_version: str, *, tracking_uri: str) -> ModelVersionInfo:
        version = self.champion if alias_or_version == "champion" else alias_or_version
        if version is None:
            raise RegistryError(f"registry: model {name!r} has no alias 'champion'")
        return ModelVersionInfo(name, version, None, (), None)

    def download(self, name: str, version: str, dst: Path, *, tracking_uri: str):
        self.downloads.append(version)
        return self.root / f"v{version}", self.info(name, version, tracking_uri=tracking_uri)


@pytest.fixture
def registry(tmp_path, monkeypatch) -> FakeRegistry:
    import medattn.registry as registry_module

    fake = FakeRegistry(tmp_path)
    monkeypatch.setattr(registry_module, "get_model_version_info", fake.info, raising=False)
    monkeypatch.setattr(registry_module, "download_model_version", fake.download, raising=False)
    return fake
