"""Every registered model honours the contract model(x) -> (logits, attention)."""

from __future__ import annotations

import pytest
import torch

from medattn.errors import ModelError
from medattn.models.bundle import load_bundle, save_bundle
from medattn.models.factory import ModelSpec, available_attentions, available_backbones, create_model
from medattn.models.global_attention import GlobalPixelAttention

IMAGE = 64
N_TRAIN = 2  # pixel representation: 2 images x 3 channels


def _build(backbone: str, attention: str) -> torch.nn.Module:
    spec = ModelSpec(backbone=backbone, attention=attention, num_classes=3, image_size=IMAGE, K=4,
                     n_pixel_channels=N_TRAIN * 3)
    model = create_model(spec)
    if isinstance(model, GlobalPixelAttention):
        model.set_pixel_representation(torch.rand(1, N_TRAIN * 3, IMAGE, IMAGE))
    return model.eval()


@pytest.mark.parametrize("attention", available_attentions())
@pytest.mark.parametrize("backbone", available_backbones())
def test_contract_shapes_and_range(backbone: str, attention: str) -> None:
    model = _build(backbone, attention)
    with torch.no_grad():
        logits, att = model(torch.randn(2, 3, IMAGE, IMAGE))
    assert logits.shape == (2, 3)
    assert att.shape == (2, 1, IMAGE, IMAGE)
    assert float(att.min()) >= 0.0 and float(att.max()) <= 1.0
    assert torch.isfinite(logits).all()


def test_global_map_is_shared_and_mldam_map_is_per_image() -> None:
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        _, global_att = _build("small_cnn", "global_pixel")(x)
        _, local_att = _build("small_cnn", "mldam")(x)
    assert torch.equal(global_att[0], global_att[1])
    assert not torch.allclose(local_att[0], local_att[1])


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="unknown backbone 'resnet9000'"):
        create_model(ModelSpec(backbone="resnet9000", attention="none", num_classes=2, image_size=32))


def test_missing_pretrained_file_names_the_path(tmp_path) -> None:
    spec = ModelSpec(backbone="resnet50", attention="none", num_classes=2, image_size=32)
    with pytest.raises(ModelError, match="not found: .*nope.pth"):
        create_model(spec, pretrained_weights=str(tmp_path / "nope.pth"))


def test_bundle_round_trip_keeps_outputs(tmp_path) -> None:
    model = _build("small_cnn", "global_pixel")
    model.freeze()
    spec = ModelSpec(backbone="small_cnn", attention="global_pixel", num_classes=3, image_size=IMAGE, K=4,
                     n_pixel_channels=N_TRAIN * 3, class_names=("a", "b", "c"))
    save_bundle(model, spec, tmp_path / "bundle")
    loaded, loaded_spec = load_bundle(tmp_path / "bundle")
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert loaded_spec == spec
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_bundle_errors_name_the_folder(tmp_path) -> None:
    with pytest.raises(ModelError, match="missing model_spec.json"):
        load_bundle(tmp_path)
