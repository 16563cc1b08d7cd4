"""Predictor, response payload and champion following, on a tiny random model (no server)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from serving_fakes import CLASSES, tiny_model

from medattn.data.preprocess import to_model_input
from medattn.errors import RegistryError
from medattn.evaluation.figures import colorize_attention
from medattn.models.factory import ModelSpec
from medattn.serving import inference
from medattn.serving.inference import (
    ChampionSlot,
    ModelRef,
    Predictor,
    RawPrediction,
    attention_png,
    build_payload,
    upsample_attention,
)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    model, spec = tiny_model()
    return Predictor(model, spec, ModelRef("tiny", "7"))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def decode_png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_predictions_are_distributions_with_maps_in_unit_range(predictor):
    outputs = predictor.predict([random_image(50, 40, 1), random_image(20, 64, 2)])
    assert len(outputs) == 2
    for raw in outputs:
        assert raw.probabilities.shape == (3,) and np.isclose(raw.probabilities.sum(), 1.0)
        assert raw.attention.shape == (32, 32) and raw.attention.dtype == np.float32
        assert 0.0 <= raw.attention.min() <= raw.attention.max() <= 1.0
        assert raw.model == ModelRef("tiny", "7") and raw.label in CLASSES


def test_serving_preprocessing_is_the_training_preprocessing(predictor):
    image = random_image(70, 45, 3)
    [raw] = predictor.predict([image])
    model, spec = predictor.model, predictor.spec
    with torch.inference_mode():
        logits, attention = model(to_model_input(image, spec.image_size, spec.mean, spec.std)[None])
    assert np.allclose(raw.probabilities, torch.softmax(logits, 1)[0].numpy(), atol=1e-6)
    assert np.allclose(raw.attention, attention[0, 0].numpy(), atol=1e-6)


def test_a_batch_gives_the_same_answers_as_single_images(predictor):
    images = [random_image(33, 33, s) for s in range(4)]
    together = predictor.predict(images)
    alone = [predictor.predict([image])[0] for image in images]
    for a, b in zip(together, alone):
        assert np.allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_uint8_arrays_are_accepted_like_images(predictor):
    image = random_image(30, 20, 4)
    [from_pil] = predictor.predict([image])
    [from_array] = predictor.predict([np.asarray(image)])
    assert np.allclose(from_pil.probabilities, from_array.probabilities)
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict([np.zeros((4, 4), dtype=np.float32)])


def test_upsampled_attention_has_the_input_size_and_stays_in_range():
    rng = np.random.default_rng(0)
    att = rng.random((32, 32)).astype(np.float32)
    big = upsample_attention(att, width=97, height=51)
    assert big.shape == (51, 97)
    assert 0.0 <= big.min() and big.max() <= 1.0
    flat = upsample_attention(np.full((8, 8), 0.25, np.float32), 30, 20)
    assert np.allclose(flat, 0.25)


def test_attention_png_is_the_colour_mapped_map_at_input_size():
    att = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    with Image.open(io.BytesIO(attention_png(att, 40, 24))) as png:
        assert png.format == "PNG" and png.size == (40, 24)
        rgb = np.asarray(png.convert("RGB"))
    assert np.array_equal(rgb, colorize_attention(upsample_attention(att, 40, 24)))


def test_payload_has_label_probabilities_model_and_png_at_input_size(predictor):
    [raw] = predictor.predict([random_image(50, 40, 5)])
    payload = build_payload(raw, 50, 40, "req-1")
    assert payload["request_id"] == "req-1" and payload["model"] == {"name": "tiny", "version": "7"}
    assert set(payload["probabilities"]) == set(CLASSES)
    assert payload["label"] == max(payload["probabilities"], key=payload["probabilities"].get)
    assert payload["image"] == {"width": 50, "height": 40}
    assert decode_png(payload["attention_png"]).shape == (40, 50, 3)
    assert "attention" not in payload


def test_raw_attention_is_returned_at_model_resolution_only_when_asked(predictor):
    [raw] = predictor.predict([random_image(50, 40, 6)])
    values = build_payload(raw, 50, 40, "r", include_raw_attention=True)["attention"]
    assert values["resolution"] == "model" and (values["height"], values["width"]) == (32, 32)
    array = np.asarray(values["values"])
    assert array.shape == (32, 32) and np.allclose(array, raw.attention, atol=1e-6)


def test_raw_prediction_survives_the_trip_to_the_api_service(predictor):
    [raw] = predictor.predict([random_image(10, 10, 7)])
    back = RawPrediction.from_wire(raw.to_wire())
    assert back.model == raw.model and back.class_names == raw.class_names
    assert np.array_equal(back.attention, raw.attention)
    assert np.allclose(back.probabilities, raw.probabilities)


def test_predictor_refuses_inconsistent_class_names():
    model, spec = tiny_model()
    bad = ModelSpec(**{**spec.to_dict(), "class_names": ("only", "two")})
    with pytest.raises(Exception, match="class names"):
        Predictor(model, bad, ModelRef("tiny", "1"))


# ---- following the champion alias ----------------------------------------------------------------


def test_slot_loads_the_champion_then_only_reloads_when_the_alias_moves(registry, tmp_path):
    registry.add_version("1", seed=1)
    registry.add_version("2", seed=2)
    slot = ChampionSlot("tiny", "sqlite:///unused.db", tmp_path / "cache")
    registry.champion = "1"
    assert slot.refresh() is True and slot.current.ref == ModelRef("tiny", "1")
    assert slot.refresh() is False and registry.downloads == ["1"]
    registry.champion = "2"
    assert slot.refresh() is True and slot.current.ref.version == "2"
    assert registry.downloads == ["1", "2"]


def test_a_failed_refresh_keeps_serving_the_previous_model(registry, tmp_path):
    registry.add_version("1", seed=1)
    slot = ChampionSlot("tiny", "sqlite:///unused.db", tmp_path / "cache")
    with pytest.raises(RegistryError):
        slot.refresh()
    assert slot.current is None and "no alias 'champion'" in slot.last_error
    registry.champion = "1"
    slot.refresh()
    registry.champion = "9"  # registered in the fake's eyes, but its bundle is missing
    with pytest.raises(Exception):  # noqa: B017 (any failure to load must leave the old model serving)
        slot.refresh()
    assert slot.current.ref.version == "1" and slot.last_error


def test_champion_alias_name_is_the_registry_convention():
    from medattn.registry import CHAMPION

    assert inference.CHAMPION_ALIAS == CHAMPION
