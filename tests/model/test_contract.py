"""Every registered method x every backbone honours the contract model(x) -> (logits, attention).

Parametrised from the registries themselves, so a newly registered method or backbone is
covered without touching this file. Models are set up through the contract's hooks only
(``configure_spec`` + ``before_training``), never by asking what class they are.
"""

from __future__ import annotations

import copy

import pytest
import torch

from medattn.models.base import AttentionModel, EpochSchedule, LossSettings
from medattn.models.bundle import load_bundle, save_bundle
from medattn.models.factory import ModelSpec, available_attentions, available_backbones, create_model, spec_for_training

IMAGE = 64
N_TRAIN = 2
COMBINATIONS = [(b, a) for a in available_attentions() for b in available_backbones()]


def _train_images() -> torch.Tensor:
    return torch.rand(N_TRAIN, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def _built(backbone: str, attention: str) -> tuple[AttentionModel, ModelSpec]:
    torch.manual_seed(0)
    base = ModelSpec(backbone=backbone, attention=attention, num_classes=3, image_size=IMAGE, K=4,
                     class_names=("a", "b", "c"))
    spec = spec_for_training(base, _train_images())
    model = create_model(spec)
    model.before_training(_train_images())
    return model.eval(), spec


@pytest.fixture(scope="module", params=COMBINATIONS, ids=[f"{b}-{a}" for b, a in COMBINATIONS])
def built(request) -> tuple[AttentionModel, ModelSpec, torch.Tensor]:
    model, spec = _built(*request.param)
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    return model, spec, x


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits, attention = model(x)
    return logits.clone(), attention.clone()


def test_registries_are_not_empty() -> None:
    assert {"global_pixel", "mldam", "none"} <= set(available_attentions())
    assert "small_cnn" in available_backbones() and len(available_backbones()) >= 7


def test_shapes_range_and_hooks(built) -> None:
    model, spec, x = built
    assert isinstance(model, AttentionModel) and model.attention_name == spec.attention
    logits, att = _outputs(model, x)
    assert logits.shape == (2, 3)
    assert att.shape == (2, 1, IMAGE, IMAGE)
    assert float(att.min()) >= 0.0 and float(att.max()) <= 1.0
    assert torch.isfinite(logits).all()
    terms = model.loss_terms(att, LossSettings(lambda_l1=0.1))
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    if model.attention_is_global:
        assert torch.equal(att[0], att[1])
        assert torch.equal(model.global_attention(), att[0, 0])
    else:
        assert model.global_attention() is None


def test_deepcopy_gives_identical_and_independent_model(built) -> None:
    model, _, x = built
    twin = copy.deepcopy(model)
    want = _outputs(model, x)
    got = _outputs(twin, x)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # the copy must be independent: changing it leaves the original's outputs alone
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
    assert torch.equal(_outputs(model, x)[0], want[0])
    assert not torch.equal(_outputs(twin, x)[0], want[0])


def test_state_dict_round_trip_into_a_fresh_model(built) -> None:
    model, spec, x = built
    model.before_saving()  # what training does before saving (seed 001: M is frozen here)
    want = _outputs(model, x)
    fresh = create_model(spec).eval()  # no training images: the saved state must be enough
    fresh.load_state_dict(model.state_dict())
    got = _outputs(fresh, x)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_bundle_round_trip_keeps_outputs(tmp_path) -> None:
    model, spec = _built("small_cnn", "global_pixel")
    model.before_saving()
    save_bundle(model, spec, tmp_path / "bundle")
    loaded, loaded_spec = load_bundle(tmp_path / "bundle")
    x = torch.randn(2, 3, IMAGE, IMAGE)
    assert loaded_spec == spec
    a, b = _outputs(model, x), _outputs(loaded, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_global_map_is_shared_and_mldam_map_is_per_image() -> None:
    x = torch.randn(2, 3, IMAGE, IMAGE)
    _, global_att = _outputs(_built("small_cnn", "global_pixel")[0], x)
    _, local_att = _outputs(_built("small_cnn", "mldam")[0], x)
    assert torch.equal(global_att[0], global_att[1])
    assert not torch.allclose(local_att[0], local_att[1])


def test_epoch_hook_freezes_the_global_map_only_after_the_cutoff() -> None:
    model, _ = _built("small_cnn", "global_pixel")
    model.on_epoch_start(EpochSchedule(epoch=2, epochs=4, cutoff_epoch=2))
    assert model.epoch_metrics() == {"pixel_cnn_frozen": 0.0}
    model.on_epoch_start(EpochSchedule(epoch=3, epochs=4, cutoff_epoch=2))
    assert model.epoch_metrics() == {"pixel_cnn_frozen": 1.0}
    assert all(not p.requires_grad for p in model.pixel_cnn.parameters())
