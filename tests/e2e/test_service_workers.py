"""Several API workers serving the model in process follow one champion: after an Accept or a Roll
back answered by one worker, no prediction from any worker comes from the old version.

The alias poll is off (``MEDATTN_POLL_SECONDS=0``), so the only way the worker that did not
handle the Accept can switch is the champion signal in the state dir
(:mod:`medattn.serving.champion_signal`); without it, that worker serves the old version forever.
Requests go over fresh connections from concurrent clients, so both workers answer.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from service_harness import MODEL_NAME, Served, make_tiny_bundle, register_version, start_served

pytestmark = pytest.mark.e2e

WORKERS = 2
CLIENTS = 6
REQUESTS_PER_CLIENT = 6


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def served_versions(service: Served) -> list[str]:
    """The model version of every answer of CLIENTS concurrent clients, each request on a new connection."""
    def one_client(seed: int) -> list[str]:
        versions = []
        for i in range(REQUESTS_PER_CLIENT):
            answer = httpx.post(f"{service.url}/predict", files={"image": ("x.png", png(seed * 100 + i), "image/png")},
                                headers=service.headers("predict"), timeout=60)
            assert answer.status_code == 200, answer.text
            versions.append(answer.json()["model"]["version"])
        return versions

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [v for versions in pool.map(one_client, range(CLIENTS)) for v in versions]


def service_workers(service: Served) -> int:
    tree = psutil.Process(service.server.process.pid).children(recursive=True)
    return sum(1 for p in tree if "serving.service" in " ".join(p.cmdline()) or "_bentoml_impl" in " ".join(p.cmdline()))


def test_every_worker_serves_the_new_champion_right_after_accept_and_rollback(registry):
    from medattn.registry import assign_challenger_and_gate

    tracking_uri, workdir = registry
    service = start_served(registry, MEDATTN_API_WORKERS=str(WORKERS), MEDATTN_INFERENCE="in_process",
                           MEDATTN_POLL_SECONDS="0")
    try:
        assert service_workers(service) >= WORKERS
        assert set(served_versions(service)) == {"1"}  # every worker has loaded v1
        version = register_version(tracking_uri, make_tiny_bundle(workdir / "bundle-workers", seed=5), metric=0.1)
        assert not assign_challenger_and_gate(MODEL_NAME, version, tracking_uri=tracking_uri).promoted

        accepted = httpx.post(f"{service.url}/promote", headers=service.headers("admin"), timeout=120)
        assert accepted.status_code == 200 and accepted.json()["champion"]["version"] == version, accepted.text
        assert set(served_versions(service)) == {version}

        rolled_back = httpx.post(f"{service.url}/rollback", headers=service.headers("admin"), timeout=120)
        assert rolled_back.status_code == 200 and rolled_back.json()["champion"]["version"] == "1", rolled_back.text
        assert set(served_versions(service)) == {"1"}
    finally:
        service.server.stop()
