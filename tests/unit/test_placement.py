"""Where the served model runs: the load-time choice, and the in-process client in both its modes."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import anyio
import numpy as np
import pytest
from serving_fakes import FakeRegistry, tiny_model

from medattn.serving.inference import ModelRef, Predictor
from medattn.serving.placement import IN_PROCESS, RUNNER, ForwardTiming, InProcessModel, choose_placement, time_forward
from medattn.serving.settings import ServingSettings

IMAGE = np.zeros((40, 30, 3), dtype=np.uint8)


def test_a_fast_model_stays_in_process_and_a_slow_one_goes_to_the_runner():
    fast = choose_placement(ForwardTiming(single_ms=4.0, batched_ms_per_image=2.0, batch_size=8), max_ms=10)
    slow = choose_placement(ForwardTiming(single_ms=90.0, batched_ms_per_image=60.0, batch_size=8), max_ms=10)
    assert fast.where == IN_PROCESS and "4.0 ms <= 10 ms" in fast.reason
    assert slow.where == RUNNER and "90.0 ms > 10 ms" in slow.reason
    assert slow.to_dict()["timing"]["single_ms"] == 90.0


def test_timing_measures_single_and_batched_passes_and_stops_early_for_a_slow_model():
    model, spec = tiny_model()
    predictor = Predictor(model, spec, ModelRef("tiny", "1"))
    timing = time_forward(predictor, max_ms=1e6, repeats=3)
    assert timing.single_ms > 0 and timing.batched_ms_per_image > 0 and timing.batch_size == 8
    # Every pass is slower than 5 x 0 ms: timed once, no batch.
    assert time_forward(predictor, max_ms=0.0).batched_ms_per_image is None


class FakeRunner:
    """The runner as the API process sees it; answers as model version "runner"."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def infer(self, images):
        self.calls.append("infer")
        return [{"probabilities": np.array([1.0, 0.0, 0.0]), "attention": np.zeros((4, 4), np.float32),
                 "class_names": ["a", "b", "c"], "model": {"name": "tiny", "version": "runner"}} for _ in images]

    async def reload(self):
        self.calls.append("reload")
        return {"changed": False, **(await self.status())}

    async def status(self):
        return {"loaded": True, "model": {"name": "tiny", "version": "runner"}, "class_names": ["a", "b", "c"],
                "image_size": 32, "last_error": None}


def settings_for(tmp_path: Path, max_ms: float) -> ServingSettings:
    return ServingSettings(tracking_uri="sqlite:///unused.db", model_name="tiny", state_dir=tmp_path,
                           feedback_db="sqlite://", blob_dir=tmp_path / "blobs", model_cache_dir=tmp_path / "cache",
                           poll_seconds=0, in_process_max_ms=max_ms)


def loaded(client: InProcessModel) -> InProcessModel:
    client.follower._thread.join(timeout=60)  # poll_seconds=0: one load, then the thread ends
    return client


def version_of(output: dict) -> str:
    return output["model"]["version"]


def test_in_process_mode_serves_follows_the_alias_and_reports_no_model(registry, tmp_path):
    registry.add_version("1", seed=1)
    registry.add_version("2", seed=2)
    client = loaded(InProcessModel(settings_for(tmp_path, max_ms=10)))
    # No champion yet: an error per image (the backend answers 503), and status says so.
    assert "no alias 'champion'" in anyio.run(client.infer, [IMAGE])[0]["error"]
    assert anyio.run(client.status)["loaded"] is False
    registry.champion = "1"
    reloaded = anyio.run(client.reload)
    assert reloaded["changed"] is True and reloaded["model"]["version"] == "1"
    assert reloaded["inference"] == {"mode": IN_PROCESS, "where": IN_PROCESS, "placement": None}
    assert version_of(anyio.run(client.infer, [IMAGE, IMAGE])[1]) == "1"
    registry.champion = "2"
    assert anyio.run(client.reload)["changed"] is True
    assert version_of(anyio.run(client.infer, [IMAGE])[0]) == "2"


def test_auto_keeps_a_fast_model_in_process_and_never_calls_the_runner(registry, tmp_path):
    registry.add_version("1", seed=1)
    registry.champion = "1"
    runner = FakeRunner()
    client = loaded(InProcessModel(settings_for(tmp_path, max_ms=1e6), runner=runner))
    assert version_of(anyio.run(client.infer, [IMAGE])[0]) == "1" and runner.calls == []
    status = anyio.run(client.status)
    assert status["inference"]["where"] == IN_PROCESS and status["inference"]["placement"]["where"] == IN_PROCESS
    assert anyio.run(client.reload)["changed"] is False and runner.calls == ["reload"]  # both follow the alias


def test_auto_sends_a_slow_model_to_the_runner_and_does_not_load_it_again(registry, tmp_path):
    registry.add_version("1", seed=1)
    registry.champion = "1"
    runner = FakeRunner()
    client = loaded(InProcessModel(settings_for(tmp_path, max_ms=0.0), runner=runner))
    assert client.follower.slot.current is None and client.follower.slot.held == ModelRef("tiny", "1")
    assert version_of(anyio.run(client.infer, [IMAGE])[0]) == "runner"
    status = anyio.run(client.status)
    assert status["loaded"] is True and status["model"]["version"] == "runner"
    assert status["inference"]["where"] == RUNNER and "> 0 ms" in status["inference"]["placement"]["reason"]
    assert anyio.run(client.reload)["changed"] is False
    assert registry.downloads == ["1"]  # the released version is not fetched and timed again


@pytest.mark.parametrize("max_ms", [0.0, 1e6])
def test_auto_answers_through_the_runner_while_it_has_no_model_of_its_own(registry, tmp_path, max_ms):
    runner = FakeRunner()
    client = loaded(InProcessModel(settings_for(tmp_path, max_ms=max_ms), runner=runner))  # no champion yet
    assert version_of(anyio.run(client.infer, [IMAGE])[0]) == "runner"
    assert anyio.run(client.status)["inference"]["where"] == RUNNER


class GatedDownloads:
    """Downloads that wait for ``gate``: the first champion load stays "in progress" until the test opens it."""

    def __init__(self, registry: FakeRegistry) -> None:
        self.registry = registry
        self.gate = threading.Event()

    def download(self, *args, **kwargs):
        self.gate.wait(timeout=60)
        return self.registry.download(*args, **kwargs)


def gate_downloads(registry: FakeRegistry, monkeypatch) -> GatedDownloads:
    """Champion "1" registered, its download held until ``gate`` opens."""
    import medattn.registry as registry_module

    registry.add_version("1", seed=1)
    registry.champion = "1"
    gated = GatedDownloads(registry)
    monkeypatch.setattr(registry_module, "download_model_version", gated.download, raising=False)
    return gated


def ask_during_the_first_load(client: InProcessModel, gated: GatedDownloads) -> tuple[list, list]:
    """One prediction asked while the download is held: (answers given before it opens, all answers)."""
    answers: list[list[dict]] = []
    before_open: list[list[dict]] = []

    async def scenario() -> None:
        async def ask() -> None:
            answers.append(await client.infer([IMAGE]))

        async with anyio.create_task_group() as group:
            group.start_soon(ask)
            await anyio.sleep(0.3)
            before_open.extend(answers)
            gated.gate.set()

    anyio.run(scenario)
    return before_open, answers


def test_a_request_during_the_first_load_waits_for_the_model_instead_of_failing(registry, tmp_path, monkeypatch):
    gated = gate_downloads(registry, monkeypatch)
    before_open, answers = ask_during_the_first_load(InProcessModel(settings_for(tmp_path, max_ms=1e6)), gated)
    assert before_open == []  # held while the model loads, not refused
    assert version_of(answers[0][0]) == "1"


def test_auto_answers_through_the_runner_during_the_first_load_without_waiting(registry, tmp_path, monkeypatch):
    gated = gate_downloads(registry, monkeypatch)
    runner = FakeRunner()
    client = InProcessModel(settings_for(tmp_path, max_ms=1e6), runner=runner)
    before_open, _ = ask_during_the_first_load(client, gated)
    assert [version_of(a[0]) for a in before_open] == ["runner"] and runner.calls == ["infer"]
    assert version_of(anyio.run(loaded(client).infer, [IMAGE])[0]) == "1"  # then its own model


def test_a_worker_told_not_to_wait_answers_still_loading(registry, tmp_path, monkeypatch):
    gated = gate_downloads(registry, monkeypatch)
    settings = dataclasses.replace(settings_for(tmp_path, max_ms=1e6), load_wait_seconds=0)
    client = InProcessModel(settings)
    try:
        assert anyio.run(client.infer, [IMAGE])[0]["error"] == "the champion model is still loading"
    finally:
        gated.gate.set()
    assert version_of(anyio.run(loaded(client).infer, [IMAGE])[0]) == "1"
