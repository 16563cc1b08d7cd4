"""ServingBackend.predict: the same answers whether the model is in this process or behind a runner,
and every answered request_id already stored (row and image) when the answer is returned."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import anyio
import numpy as np
import pytest
from PIL import Image
from serving_fakes import tiny_model
from sqlalchemy import text

from medattn.serving.backend import ServingBackend, Upload
from medattn.serving.imaging import ImageRejected
from medattn.serving.inference import ModelRef, Predictor
from medattn.serving.settings import ServingSettings


def png(seed: int, width: int = 40, height: int = 30) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class LocalClient:
    """The in-process model client: ``local_predictor`` is what the backend calls directly."""

    def __init__(self, predictor: Optional[Predictor]) -> None:
        self.predictor = predictor
        self.infer_calls = 0

    def local_predictor(self) -> Optional[Predictor]:
        return self.predictor

    async def infer(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        self.infer_calls += 1
        return [raw.to_wire() for raw in self.predictor.predict(images)]

    async def reload(self) -> dict[str, Any]:
        return {"changed": False}

    async def status(self) -> dict[str, Any]:
        return {"loaded": True}


class RunnerOnly(LocalClient):
    """A runner client: everything goes through infer (a protocol member set to None is absent)."""

    local_predictor = None  # type: ignore[assignment]


@pytest.fixture
def predictor() -> Predictor:
    model, spec = tiny_model()
    return Predictor(model, spec, ModelRef("tiny", "7"))


def backend_with(client: Any, tmp_path: Path) -> ServingBackend:
    settings = ServingSettings(tracking_uri="sqlite:///unused.db", model_name="tiny", state_dir=tmp_path,
                               feedback_db=f"sqlite:///{tmp_path / 'feedback.db'}", blob_dir=tmp_path / "blobs",
                               model_cache_dir=tmp_path / "cache", poll_seconds=0, open_predict=True)
    return ServingBackend(settings, client)


def answers_and_storage(client: Any, tmp_path: Path, uploads: list[Upload]) -> tuple[list[dict], ServingBackend]:
    backend = backend_with(client, tmp_path)
    payloads = anyio.run(backend.predict, uploads)
    # Checked before close(): nothing may still be waiting in the writer's queue.
    for payload in payloads:
        record = backend.store.get_prediction(payload["request_id"])
        assert record.label == payload["label"]
        assert backend.blobs.exists(record.image_sha256)
    return payloads, backend


def test_in_process_and_runner_paths_answer_alike_and_store_before_answering(predictor, tmp_path):
    uploads = [Upload(png(seed), "image/png", "images") for seed in range(3)]
    local = LocalClient(predictor)
    here, backend = answers_and_storage(local, tmp_path / "here", uploads)
    backend.close()
    assert local.infer_calls == 0  # the local path never goes through infer
    runner = RunnerOnly(predictor)
    there, backend = answers_and_storage(runner, tmp_path / "runner", uploads)
    backend.close()
    assert runner.infer_calls == 1
    strip = [{k: v for k, v in p.items() if k != "request_id"} for p in here]
    assert strip == [{k: v for k, v in p.items() if k != "request_id"} for p in there]
    assert len({p["request_id"] for p in here + there}) == 6


def test_a_process_without_its_model_yet_goes_through_infer(tmp_path):
    client = LocalClient(None)
    backend = backend_with(client, tmp_path)

    async def infer(images):
        client.infer_calls += 1
        return [{"error": "the champion model is still loading"} for _ in images]

    client.infer = infer  # type: ignore[method-assign]
    with pytest.raises(Exception, match="no model loaded"):
        anyio.run(backend.predict, [Upload(png(0), "image/png")])
    assert client.infer_calls == 1
    backend.close()


def test_a_bad_image_in_process_is_refused_and_nothing_is_stored(predictor, tmp_path):
    backend = backend_with(LocalClient(predictor), tmp_path)
    with pytest.raises(ImageRejected, match=r"images\[1\]"):
        anyio.run(backend.predict, [Upload(png(0), "image/png", "images"), Upload(b"\x89PNG\r\n\x1a\nbroken",
                                                                                 "image/png", "images")])
    with backend.store.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one() == 0
    backend.close()


class FollowingClient(LocalClient):
    """An in-process worker's client that, told to follow, loads what the registry now names."""

    def __init__(self, registry: dict[str, Predictor]) -> None:
        super().__init__(registry["champion"])
        self.registry = registry
        self.follows = 0

    def follow_champion(self) -> bool:
        self.follows += 1
        if self.registry.get("broken"):
            raise RuntimeError("registry unreachable")
        changed = self.predictor is not self.registry["champion"]
        self.predictor = self.registry["champion"]
        return changed

    async def reload(self) -> dict[str, Any]:
        return {"changed": self.follow_champion()}


def test_a_reload_in_one_worker_makes_the_others_serve_the_new_champion_at_their_next_request(tmp_path):
    model, spec = tiny_model()
    registry = {"champion": Predictor(model, spec, ModelRef("tiny", "1"))}
    first, second = FollowingClient(registry), FollowingClient(registry)
    # two API workers of one service: the same state dir, their own feedback connection and model
    worker_a, worker_b = backend_with(first, tmp_path), backend_with(second, tmp_path)
    try:
        upload = [Upload(png(0), "image/png")]
        assert anyio.run(worker_b.predict, upload)[0]["model"]["version"] == "1"
        assert second.follows == 0  # no signal yet: nothing to follow, no registry call per request
        registry["champion"] = Predictor(model, spec, ModelRef("tiny", "2"))  # the alias moved
        anyio.run(worker_a.reload)  # an Accept / Roll back / admin reload, in worker A
        assert anyio.run(worker_b.predict, upload)[0]["model"]["version"] == "2"
        assert second.follows == 1
        anyio.run(worker_b.predict, upload)
        assert second.follows == 1  # followed once per signal, not per request
        # a failed follow keeps the old model serving and is not retried on every request
        registry["champion"], registry["broken"] = Predictor(model, spec, ModelRef("tiny", "3")), True
        worker_a.champion_signal.send("another reload")
        assert anyio.run(worker_b.predict, upload)[0]["model"]["version"] == "2"
        anyio.run(worker_b.predict, upload)
        assert second.follows == 2
    finally:
        worker_a.close()
        worker_b.close()
