"""Factory and bundle errors (the contract itself: test_contract.py)."""

from __future__ import annotations

import pytest

from medattn.errors import ModelError
from medattn.models.bundle import load_bundle
from medattn.models.factory import ModelSpec, create_model


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="unknown backbone 'resnet9000'"):
        create_model(ModelSpec(backbone="resnet9000", attention="none", num_classes=2, image_size=32))


def test_missing_pretrained_file_names_the_path(tmp_path) -> None:
    spec = ModelSpec(backbone="resnet50", attention="none", num_classes=2, image_size=32)
    with pytest.raises(ModelError, match="not found: .*nope.pth"):
        create_model(spec, pretrained_weights=str(tmp_path / "nope.pth"))




def test_bundle_errors_name_the_folder(tmp_path) -> None:
    with pytest.raises(ModelError, match="missing model_spec.json"):
        load_bundle(tmp_path)


def test_unknown_attention_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="unknown attention 'magic'.*global_pixel"):
        create_model(ModelSpec(backbone="small_cnn", attention="magic", num_classes=2, image_size=32))
