"""BentoML services of medattn: ``bentoml serve serving.service:MedattnService`` (from the repo root).

Two services, two processes:

- :class:`ModelRunner` holds the model of the registry alias ``champion`` (settings:
  :mod:`medattn.serving.settings`) and answers ``infer`` with adaptive batching: concurrent
  requests are merged into one forward pass. It follows the alias on its own (every
  ``MEDATTN_POLL_SECONDS``) and on ``reload``; its ``/readyz`` is 503 until a model is loaded.
- :class:`MedattnService` is the HTTP entry point: the FastAPI app of :mod:`serving.app`
  (one router per concern: predict, feedback, admin) mounted into BentoML, which keeps ``/livez``, ``/readyz``
  (ready once the runner has a model) and ``/metrics`` (BentoML's request metrics + medattn's).
  It reaches the runner through ``bentoml.depends``: a service never calls its own batched API.

Where the model runs is ``MEDATTN_INFERENCE`` (:mod:`medattn.serving.placement`), read at import:
``runner`` as above; ``in_process``: the API service holds and follows the champion itself and
no runner process is started; ``auto`` (default): both run, and the API process keeps a model
that its load-time timing finds fast enough (the demo ``small_cnn``), leaving slower ones to the
runner's batches.

Batching is tuned by ``MEDATTN_BATCH_MAX_SIZE`` (16) and ``MEDATTN_BATCH_MAX_LATENCY_MS`` (1000),
read at import. BentoML's dispatcher sheds a queued request with a 503 once its expected latency
passes ``max_latency_ms``, and it also scales its first cost guesses by it: a large value makes the
first batched requests after start-up wait for company for up to several seconds. Raise it for a
model whose batches take longer than about a second (a large CNN on CPU).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from typing import Any

import anyio
import bentoml
import numpy as np
import torch

from medattn.devices import resolve_device
from medattn.errors import first_line
from medattn.serving import metrics
from medattn.serving.backend import HttpProblem, ModelClient, ServingBackend
from medattn.serving.placement import ChampionFollower, InProcessModel
from medattn.serving.settings import ServingSettings, api_workers_from_env, inference_mode_from_env
from serving.app import app
from serving.client_timeouts import install_client_timeouts
from serving.http_errors import JsonRoutingErrors

log = logging.getLogger("medattn.serving")

BATCH_MAX_SIZE = int(os.environ.get("MEDATTN_BATCH_MAX_SIZE", "16"))
# HTTP worker processes (decode, encode, feedback I/O; the model too when served in process):
# one per core up to 4 unless MEDATTN_API_WORKERS says; the model runner stays one process
API_WORKERS = api_workers_from_env()
BATCH_MAX_LATENCY_MS = int(os.environ.get("MEDATTN_BATCH_MAX_LATENCY_MS", "1000"))
RUNNER_CALL_TIMEOUT_S = 120
# auto | in_process | runner (MEDATTN_INFERENCE): read at import, because it decides whether the
# API service depends on the runner service at all.
INFERENCE_MODE = inference_mode_from_env()


def freeze_startup_heap() -> None:
    """Exempt everything allocated so far from garbage collection passes.

    After start-up a worker holds millions of long-lived objects (torch, MLflow, BentoML); each
    full collection walked them all, a pause of about 300 ms on a 2-core machine that made the
    slowest 1% of predictions several times slower than the median. They are never garbage.
    """
    gc.collect()
    gc.freeze()


# runner_connection: BentoML's client to this service otherwise swaps its HTTP session every 100
# calls and closes the old one under calls still in flight ("Server disconnected", or a hang).
@bentoml.service(name="medattn_model_runner", workers=1, traffic={"timeout": 300},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 365 * 86400.0})
class ModelRunner:
    """The champion model behind an adaptive-batching ``infer`` API."""

    def __init__(self) -> None:
        self.settings = ServingSettings.from_env()
        torch.set_num_threads(self.settings.runner_torch_threads)
        self.follower = ChampionFollower(self.settings)
        self.slot = self.follower.slot
        self.follower.start()
        freeze_startup_heap()

    def __is_ready__(self) -> bool:
        return self.slot.current is not None

    @bentoml.api(batchable=True, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def infer(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """(H, W, 3) uint8 RGB images -> one wire dict each (``{"error": ...}`` when no model)."""
        predictor = self.slot.current  # one model for the whole batch, even if a reload lands now
        if predictor is None:
            reason = self.slot.last_error or "the champion model is still loading"
            return [{"error": reason} for _ in images]
        return [raw.to_wire() for raw in predictor.predict(images)]

    @bentoml.api
    async def reload(self) -> dict[str, Any]:
        """Load the champion now; inference keeps running on the old model meanwhile."""
        try:
            changed = await anyio.to_thread.run_sync(self.follower.refresh)
        except Exception as exc:  # noqa: BLE001 - reported to the admin who asked, and logged
            return {"error": first_line(exc)}
        return {"changed": changed, **(await self.status())}

    @bentoml.api
    async def status(self) -> dict[str, Any]:
        return self.follower.status()

    @bentoml.on_shutdown
    def stop_following(self) -> None:
        self.follower.stop()


class RunnerClient:
    """The runner dependency as :class:`medattn.serving.backend.ModelClient`: async calls, transport retries.

    BentoML 1.4's client replaces its HTTP session every 100 calls and closes the old one even
    while other calls are still using it, which fails them with "Server disconnected". Every
    runner call is side-effect free or idempotent, so a dropped connection is retried; what
    still fails (runner restarting, requests shed by the batcher) is a 503, never a 500.
    """

    ATTEMPTS = 3

    def __init__(self, runner: Any) -> None:
        self._runner = runner

    async def infer(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        return await self._call("infer", images)

    async def reload(self) -> dict[str, Any]:
        return await self._call("reload")

    async def status(self) -> dict[str, Any]:
        status = await self._call("status")
        return {**status, "inference": {"mode": "runner", "where": "runner", "placement": None}}

    async def _call(self, method: str, *args: Any) -> Any:
        import aiohttp
        from bentoml.exceptions import BentoMLException

        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                return await asyncio.wait_for(getattr(self._runner.to_async, method)(*args), RUNNER_CALL_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("model runner did not answer %s within %d s", method, RUNNER_CALL_TIMEOUT_S)
                raise HttpProblem(503, "model runner did not answer in time; retry shortly") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                if attempt == self.ATTEMPTS:
                    log.warning("model runner unreachable for %s: %s", method, first_line(exc))
                    raise HttpProblem(503, "model runner is unreachable (restarting?); retry shortly") from None
            except BentoMLException as exc:
                # The batcher sheds requests that waited past max_latency_ms with a 503.
                log.warning("model runner refused %s: %s", method, first_line(exc)[:200])
                raise HttpProblem(503, "model runner is overloaded; retry shortly") from None
        raise AssertionError("unreachable")


@bentoml.service(name="medattn", workers=API_WORKERS, traffic={"timeout": 300})
@bentoml.asgi_app(app)
class MedattnService:
    """HTTP entry point: predictions with attention maps, expert feedback, model switching."""

    # in_process: no dependency, so BentoML starts no runner process at all (see INFERENCE_MODE).
    if INFERENCE_MODE != "in_process":
        runner = bentoml.depends(ModelRunner)

    def __init__(self) -> None:
        settings = ServingSettings.from_env()
        self.backend = ServingBackend(settings, self._model_client(settings))
        log.info("medattn service: model %r from %s, feedback in %s", settings.model_name,
                 settings.tracking_uri, self.backend.store.safe_url)
        freeze_startup_heap()

    async def __is_ready__(self) -> bool:
        try:
            status = await self.backend.model_status()
        except Exception as exc:  # noqa: BLE001 - runner not up yet: simply not ready
            log.debug("runner status unavailable: %s", exc)
            return False
        return bool(status.get("loaded"))

    def _model_client(self, settings: ServingSettings) -> ModelClient:
        """Where this worker's predictions run (:mod:`medattn.serving.placement`)."""
        if INFERENCE_MODE == "in_process":
            torch.set_num_threads(settings.in_process_torch_threads(API_WORKERS))
            return InProcessModel(settings)
        runner = RunnerClient(self.runner)
        # auto on an accelerator: batching keeps it busy, so this process never loads the model.
        if INFERENCE_MODE == "runner" or resolve_device(settings.device).type != "cpu":
            return runner
        torch.set_num_threads(settings.in_process_torch_threads(API_WORKERS))
        return InProcessModel(settings, runner=runner)

    @bentoml.on_shutdown
    def close_store(self) -> None:
        if isinstance(self.backend.runner, InProcessModel):
            self.backend.runner.close()
        self.backend.close()


# Requests no route matches are answered by BentoML's own router, in plain text; this gives them
# the JSON error body of every other error.
MedattnService.add_asgi_middleware(JsonRoutingErrors)
# /metrics shows the recalibration scheduler's state as it is at scrape time (another process's).
MedattnService.add_asgi_middleware(metrics.RecalibrationStateOnScrape)
# Bounded /metrics (endpoint = route template) and deadlines for stalled clients: see the modules.
metrics.bound_bentoml_request_labels(app.openapi()["paths"])  # the routes' templates, as published
install_client_timeouts(MedattnService)
