"""Where the served model runs: in the API process, or in the adaptive-batching model runner.

The runner (``serving/service.py: ModelRunner``) merges concurrent requests into one forward pass,
which pays for a large model; but every request then crosses one more HTTP hop (serialise, send,
queue, parse: several ms of CPU on a small machine). For the demo ``small_cnn``, whose forward pass
takes about 4 ms on the CPU, that hop costs more than the model and the batcher rarely forms
batches, so the API process serves it faster itself. ``MEDATTN_INFERENCE`` chooses
(:class:`medattn.serving.settings.ServingSettings`):

- ``runner``: always the runner (no model in the API process);
- ``in_process``: always the API process (no runner process is started at all);
- ``auto``: both services run; each time the API process loads a champion it times the forward
  pass (:func:`time_forward`) and keeps the weights only if one image takes at most
  ``MEDATTN_IN_PROCESS_MAX_MS`` (:func:`choose_placement`); otherwise it drops them and sends
  that version's requests to the runner. On an accelerator ``auto`` always means the runner:
  batching is what keeps a GPU busy, and the API process then never loads the model.

:class:`ChampionFollower` keeps a :class:`~medattn.serving.inference.ChampionSlot` on the
registry alias (a poll thread plus ``refresh()`` on demand) for the runner and the API process
alike; :class:`InProcessModel` is the :class:`~medattn.serving.backend.ModelClient` the API
process uses in ``in_process`` and ``auto`` modes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import anyio
import numpy as np
from anyio import to_thread

from medattn.errors import first_line
from medattn.serving import metrics as serving_metrics
from medattn.serving.inference import ChampionSlot, Predictor
from medattn.serving.settings import ServingSettings

log = logging.getLogger("medattn.serving")

IN_PROCESS = "in_process"
RUNNER = "runner"
TIMING_BATCH_SIZE = 8
FIRST_LOAD_POLL_S = 0.05


@dataclass(frozen=True)
class ForwardTiming:
    """Fastest time of ``Predictor.predict`` (pre-processing included) on synthetic images."""

    single_ms: float
    batched_ms_per_image: Optional[float]  # None when the single pass was already far too slow
    batch_size: int


@dataclass(frozen=True)
class Placement:
    """Where one model version is served, and why."""

    where: str  # IN_PROCESS or RUNNER
    reason: str
    timing: Optional[ForwardTiming] = None

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "reason": self.reason,
                "timing": asdict(self.timing) if self.timing is not None else None}


def time_forward(predictor: Predictor, max_ms: float, repeats: int = 10) -> ForwardTiming:
    """Time one image and a batch of :data:`TIMING_BATCH_SIZE`, after a warm-up pass.

    The fastest of ``repeats`` passes, each the lesser of its wall and CPU time: other work on
    a busy machine only ever adds time, and the decision must not send a small model to the
    runner because a training job was running while the champion loaded. A model whose warm-up already took
    over 5x ``max_ms`` is timed no further: a large CNN on the CPU should not spend seconds here.
    """
    size = predictor.spec.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)

    def once(count: int) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        predictor.predict([image] * count)
        # The lesser of wall and process CPU time: on a loaded machine the wall clock also counts
        # the time other processes held the cores (CPU time does not), and while requests are
        # being answered CPU time also counts their work (the wall clock does not).
        return min(time.perf_counter() - wall, time.process_time() - cpu) * 1000

    warmup_ms = once(1)
    if warmup_ms > 5 * max_ms:
        return ForwardTiming(single_ms=warmup_ms, batched_ms_per_image=None, batch_size=TIMING_BATCH_SIZE)
    single = min(once(1) for _ in range(repeats))
    batched = min(once(TIMING_BATCH_SIZE) for _ in range(max(1, repeats // 3))) / TIMING_BATCH_SIZE
    return ForwardTiming(single_ms=single, batched_ms_per_image=batched, batch_size=TIMING_BATCH_SIZE)


def choose_placement(timing: ForwardTiming, max_ms: float) -> Placement:
    """In process when one image's forward pass takes at most ``max_ms``, else the runner."""
    if timing.single_ms <= max_ms:
        return Placement(IN_PROCESS, f"one image takes {timing.single_ms:.1f} ms <= {max_ms:g} ms: "
                                     "the runner hop would cost about as much as the model", timing)
    return Placement(RUNNER, f"one image takes {timing.single_ms:.1f} ms > {max_ms:g} ms: "
                             "adaptive batching in the runner", timing)


class ChampionFollower:
    """A :class:`ChampionSlot` that follows the champion alias by itself and on ``refresh()``.

    ``record_metrics`` makes this process own the lifecycle metrics (model loaded, version,
    reloads); in ``auto`` mode the runner owns them and the API process's follower stays quiet,
    so a reload is counted once. ``keep`` is passed to :meth:`ChampionSlot.refresh`.
    """

    def __init__(self, settings: ServingSettings, *, record_metrics: bool = True, keep=None) -> None:
        self.settings = settings
        self.slot = ChampionSlot(settings.model_name, settings.tracking_uri, settings.model_cache_dir,
                                 settings.device)
        self.metrics = serving_metrics.get_metrics()
        self.record_metrics = record_metrics
        self._keep = keep
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # Set once the first load has finished, loaded or failed: until then "no model" only
        # means "not yet", and a request is better held than refused (InProcessModel.infer).
        self.first_load_done = threading.Event()
        if record_metrics:
            self.metrics.clear_serving_model()

    def start(self) -> None:
        """Load in the background, so the process starts (and ``/livez`` answers) at once."""
        self._thread = threading.Thread(target=self._follow, name="champion-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> bool:
        try:
            changed = self.slot.refresh(self._keep)
        except Exception:
            log.warning("cannot load the champion of %r from %s: %s", self.settings.model_name,
                        self.settings.tracking_uri, self.slot.last_error)
            if self.record_metrics:
                self.metrics.record_model_reload(success=False)
                if self.slot.held is None:
                    self.metrics.clear_serving_model()
            raise
        if changed and self.record_metrics:
            ref = self.slot.held
            self.metrics.set_serving_model(ref.name, ref.version)
            self.metrics.record_model_reload(success=True)
        return changed

    def status(self) -> dict[str, Any]:
        predictor = self.slot.current
        return {
            "loaded": predictor is not None,
            "model": predictor.ref.to_dict() if predictor else None,
            "class_names": list(predictor.class_names) if predictor else [],
            "image_size": predictor.spec.image_size if predictor else None,
            "last_error": self.slot.last_error,
        }

    def _follow(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - logged in refresh; the next poll tries again
                pass
            finally:
                self.first_load_done.set()
            if self.settings.poll_seconds <= 0 or self._stop.wait(self.settings.poll_seconds):
                return


class InProcessModel:
    """The champion in the API process, as a ``ModelClient``; with ``runner``, the ``auto`` mode.

    Alone (``in_process``) it serves every version itself. With a runner it times each newly
    loaded version and keeps it only when it is fast enough (:func:`choose_placement`); a
    version it released is answered by the runner, and so is everything while it holds no model
    (still loading, or its load failed), so the two paths back each other up.
    """

    def __init__(self, settings: ServingSettings, runner: Any = None) -> None:
        self.runner = runner
        self.mode = IN_PROCESS if runner is None else "auto"
        self.placement: Optional[Placement] = None
        keep = None if runner is None else self._keep_if_fast
        self.follower = ChampionFollower(settings, record_metrics=runner is None, keep=keep)
        self.follower.start()

    def _keep_if_fast(self, predictor: Predictor) -> bool:
        max_ms = self.follower.settings.in_process_max_ms
        placement = choose_placement(time_forward(predictor, max_ms), max_ms)
        log.info("model %s version %s served %s: %s", predictor.ref.name, predictor.ref.version,
                 "in the API process" if placement.where == IN_PROCESS else "by the runner", placement.reason)
        self.placement = placement
        return placement.where == IN_PROCESS

    def close(self) -> None:
        self.follower.stop()

    def follow_champion(self) -> bool:
        """Load the current champion into this process now (the champion signal; blocking)."""
        return self.follower.refresh()

    def local_predictor(self) -> Optional[Predictor]:
        """The model this process holds now (None: still loading, failed, or served by the runner).

        The backend calls it directly in a worker thread, decode and answer included
        (:meth:`medattn.serving.backend.ServingBackend.predict`); the one reference read here is
        the model of the whole request, even if a reload lands meanwhile.
        """
        return self.follower.slot.current

    async def wait_for_first_load(self) -> None:
        """Hold the caller until this process's first champion load has ended (at most ``load_wait_seconds``).

        Several API workers share one socket, and ``/readyz`` is answered by whichever worker the
        probe reaches: a worker still loading its model gets requests once another one is ready.
        Refusing them (503) while the load is seconds from done is worse than waiting for it. Only
        ``in_process`` waits: in ``auto`` the runner answers until this process holds a model.
        """
        done = self.follower.first_load_done
        deadline = time.monotonic() + self.follower.settings.load_wait_seconds
        while not done.is_set() and time.monotonic() < deadline:
            await anyio.sleep(FIRST_LOAD_POLL_S)

    async def infer(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        predictor = self.follower.slot.current  # one model for the whole request, even if a reload lands
        if predictor is None and self.runner is None and not self.follower.first_load_done.is_set():
            await self.wait_for_first_load()  # (auto: the runner answers meanwhile, as below)
            predictor = self.follower.slot.current
        if predictor is None:
            if self.runner is not None:
                return await self.runner.infer(images)
            reason = self.follower.slot.last_error or "the champion model is still loading"
            return [{"error": reason} for _ in images]
        outputs = await to_thread.run_sync(predictor.predict, images)
        return [raw.to_wire() for raw in outputs]

    async def reload(self) -> dict[str, Any]:
        """The runner first (when there is one), then this process: both follow the same alias."""
        runner_changed = False
        if self.runner is not None:
            result = await self.runner.reload()
            if "error" in result:
                return result
            runner_changed = bool(result.get("changed"))
        try:
            changed = await to_thread.run_sync(self.follower.refresh)
        except Exception as exc:  # noqa: BLE001 - reported to the admin who asked, and logged
            return {"error": first_line(exc)}
        return {"changed": changed or runner_changed, **(await self.status())}

    async def status(self) -> dict[str, Any]:
        local = self.follower.status()
        if local["loaded"] or self.runner is None:
            status = local
        else:
            status = await self.runner.status()
        placement = self.placement.to_dict() if self.placement is not None else None
        where = IN_PROCESS if local["loaded"] else RUNNER
        return {**status, "inference": {"mode": self.mode, "where": where, "placement": placement}}
