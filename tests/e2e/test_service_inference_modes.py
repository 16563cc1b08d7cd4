"""``MEDATTN_INFERENCE=runner`` and ``in_process`` against a real ``bentoml serve``.

``test_service.py`` covers the whole HTTP surface in the default ``auto`` mode (its tiny model is
served in the API process). Here each forced mode gets one server and the lifecycle that differs
between them: which processes run, readiness, predictions under concurrency, the model metrics,
and promote / rollback / polling following the champion alias.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_harness import MODEL_NAME, Served, make_tiny_bundle, register_version, start_served
from test_service import image_bytes, predict, served_version, wait_for_version

pytestmark = pytest.mark.e2e

RUNNER_SERVICE = "medattn_model_runner"


@pytest.fixture(params=["runner", "in_process"])
def moded(request, tmp_path) -> Served:
    from medattn.registry import assign_challenger_and_gate

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register_version(tracking_uri, make_tiny_bundle(tmp_path / "bundle-v1", seed=1), metric=0.5)
    assert assign_challenger_and_gate(MODEL_NAME, version, tracking_uri=tracking_uri).promoted
    running = start_served((tracking_uri, tmp_path), MEDATTN_INFERENCE=request.param, MEDATTN_POLL_SECONDS="1")
    running.mode = request.param
    try:
        yield running
    finally:
        running.server.stop()


def runs_a_runner_process(service: Served) -> bool:
    return any(RUNNER_SERVICE in " ".join(proc.cmdline()) for proc in service.server.processes())


def test_each_mode_serves_follows_the_alias_and_reports_where_the_model_runs(moded: Served):
    from medattn.registry import assign_challenger_and_gate, promote_challenger

    assert runs_a_runner_process(moded) is (moded.mode == "runner")
    with httpx.Client(base_url=moded.url, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        status = client.get("/model", headers=moded.headers("predict")).json()
        assert status["loaded"] is True and status["model"]["version"] == "1"
        assert status["inference"]["mode"] == moded.mode and status["inference"]["where"] == moded.mode

        def one(seed: int) -> httpx.Response:
            with httpx.Client(base_url=moded.url, timeout=60) as own:
                return predict(own, moded, image_bytes(40, 30, seed=seed))

        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(one, range(12)))
        assert [r.status_code for r in answers] == [200] * 12, [r.text for r in answers if r.status_code != 200]
        assert {r.json()["model"]["version"] for r in answers} == {"1"}

        metrics = client.get("/metrics").text
        assert "medattn_model_loaded 1.0" in metrics
        assert f'medattn_model_info{{model_name="{MODEL_NAME}",version="1"}} 1.0' in metrics
        assert 'medattn_predictions_total{label=' in metrics
        batched = [line for line in metrics.splitlines()
                   if line.startswith("bentoml_service_adaptive_batch_size_count") and 'method_name="infer"' in line]
        assert bool(batched) is (moded.mode == "runner")  # only the runner batches

        version = register_version(moded.tracking_uri, make_tiny_bundle(moded.workdir / "bundle-v2", seed=2),
                                   metric=0.1)
        assert not assign_challenger_and_gate(MODEL_NAME, version, tracking_uri=moded.tracking_uri).promoted
        promoted = client.post("/promote", headers=moded.headers("admin"))
        assert promoted.status_code == 200, promoted.text
        assert served_version(client, moded) == "2"
        assert client.post("/rollback", headers=moded.headers("admin")).status_code == 200
        assert served_version(client, moded) == "1"
        assert client.post("/reload", headers=moded.headers("admin")).json()["changed"] is False

        promote_challenger(MODEL_NAME, tracking_uri=moded.tracking_uri)  # behind the service's back
        wait_for_version(client, moded, "2")
        assert served_version(client, moded) == "2"
        deadline = time.monotonic() + 30
        while f'medattn_model_info{{model_name="{MODEL_NAME}",version="2"}} 1.0' not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "model_info never showed version 2"
            time.sleep(0.5)
