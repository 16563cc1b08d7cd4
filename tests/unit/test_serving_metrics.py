"""medattn.serving.metrics: attention statistics, labelled series, and exposure on BentoML's /metrics."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from medattn.serving import metrics as m
from medattn.serving.metrics import ServingMetrics, attention_entropy, central_field_mask, central_mass


def _blob(size: int, row: float, col: float, sigma: float = 3.0) -> np.ndarray:
    r, c = np.mgrid[0:size, 0:size] + 0.5
    return np.exp(-((r - row) ** 2 + (c - col) ** 2) / (2 * sigma**2))


# --- pure helpers -------------------------------------------------------------------------------

def test_entropy_of_uniform_map_is_the_maximum_one():
    assert attention_entropy(np.full((32, 32), 0.3)) == pytest.approx(1.0)


def test_entropy_of_one_hot_map_is_zero():
    att = np.zeros((32, 32))
    att[5, 7] = 1.0
    assert attention_entropy(att) == 0.0


def test_entropy_of_a_blob_lies_between_and_ignores_scale_and_singleton_dims():
    blob = _blob(32, 16, 16)
    value = attention_entropy(blob)
    assert 0.2 < value < 0.9
    assert attention_entropy(0.25 * blob) == pytest.approx(value)
    assert attention_entropy(blob[None, None]) == pytest.approx(value)


def test_all_zero_map_counts_as_uniform():
    assert attention_entropy(np.zeros((8, 8))) == pytest.approx(1.0)
    assert central_mass(np.zeros((8, 8))) == pytest.approx(central_field_mask(8, 8).mean())


@pytest.mark.parametrize("bad", [np.ones(16), np.ones((2, 8, 8)), np.full((4, 4), np.nan),
                                 -np.ones((4, 4)), np.ones((1, 1))])
def test_helpers_reject_what_is_not_one_valid_map(bad):
    with pytest.raises(ValueError):
        attention_entropy(bad)
    with pytest.raises(ValueError):
        central_mass(bad)


def test_central_mass_of_centred_blob_is_about_one_and_of_corner_blob_about_zero():
    assert central_mass(_blob(96, 48, 48)) > 0.99
    assert central_mass(_blob(96, 6, 90)) < 0.01


def test_central_field_is_the_disc_of_radius_a_quarter_of_the_shorter_side():
    assert central_field_mask(96, 96).sum() == pytest.approx(math.pi * 24**2, rel=0.02)
    mask = central_field_mask(40, 80)
    assert mask.sum() == pytest.approx(math.pi * 10**2, rel=0.05)
    assert mask[20, 40] and not mask[20, 52] and not mask[8, 40]
    # A uniform map puts pi/16 of its mass in the central field.
    assert central_mass(np.ones((96, 96))) == pytest.approx(math.pi / 16, abs=0.005)


# --- labelled series ----------------------------------------------------------------------------

@pytest.fixture()
def reg_metrics() -> tuple[CollectorRegistry, ServingMetrics]:
    registry = CollectorRegistry()
    return registry, ServingMetrics(registry=registry)


def test_recording_a_prediction_increments_the_series_of_its_label_and_version(reg_metrics):
    registry, metrics = reg_metrics
    att = _blob(32, 16, 16)
    for _ in range(2):
        metrics.record_prediction(label="referable", model_version="3", confidence=0.75, attention=att)
    metrics.record_prediction(label="healthy", model_version="3", confidence=0.5, attention=att)

    get = registry.get_sample_value
    assert get("medattn_predictions_total", {"label": "referable", "model_version": "3"}) == 2
    assert get("medattn_predictions_total", {"label": "healthy", "model_version": "3"}) == 1
    assert get("medattn_predictions_total", {"label": "referable", "model_version": "4"}) is None
    assert get("medattn_prediction_confidence_count", {"model_version": "3"}) == 3
    assert get("medattn_prediction_confidence_sum", {"model_version": "3"}) == pytest.approx(2.0)
    assert get("medattn_prediction_confidence_bucket", {"model_version": "3", "le": "0.5"}) == 1
    assert get("medattn_attention_entropy_sum", {"model_version": "3"}) == pytest.approx(3 * attention_entropy(att))
    assert get("medattn_attention_central_mass_sum", {"model_version": "3"}) == pytest.approx(3 * central_mass(att))


@pytest.mark.parametrize("confidence", [1.5, -0.1, float("nan")])
def test_an_invalid_confidence_is_rejected_and_nothing_is_recorded(reg_metrics, confidence):
    registry, metrics = reg_metrics
    with pytest.raises(ValueError):
        metrics.record_prediction(label="x", model_version="1", confidence=confidence, attention=np.ones((4, 4)))
    assert registry.get_sample_value("medattn_predictions_total", {"label": "x", "model_version": "1"}) is None


def test_feedback_is_counted_by_roi_kinds_and_label_correction(reg_metrics):
    registry, metrics = reg_metrics
    metrics.record_feedback(relevant_rois=2, irrelevant_rois=0, label_corrected=False)
    metrics.record_feedback(relevant_rois=1, irrelevant_rois=3, label_corrected=True)
    metrics.record_feedback(relevant_rois=0, irrelevant_rois=0, label_corrected=True)
    get = registry.get_sample_value
    assert get("medattn_feedback_total", {"roi_kinds": "relevant", "label_corrected": "no"}) == 1
    assert get("medattn_feedback_total", {"roi_kinds": "both", "label_corrected": "yes"}) == 1
    assert get("medattn_feedback_total", {"roi_kinds": "none", "label_corrected": "yes"}) == 1
    assert get("medattn_feedback_rois_total", {"kind": "relevant"}) == 3
    assert get("medattn_feedback_rois_total", {"kind": "irrelevant"}) == 3
    metrics.set_feedback_waiting(42)
    assert get("medattn_feedback_waiting") == 42


def test_serving_model_info_follows_reloads_and_unloads(reg_metrics):
    registry, metrics = reg_metrics
    get = registry.get_sample_value
    assert get("medattn_model_loaded") == 0
    metrics.set_serving_model("medattn-fundus", "3")
    metrics.set_serving_model("medattn-fundus", "4")
    assert get("medattn_model_info", {"model_name": "medattn-fundus", "version": "3"}) == 0
    assert get("medattn_model_info", {"model_name": "medattn-fundus", "version": "4"}) == 1
    assert get("medattn_model_loaded") == 1
    metrics.clear_serving_model()
    assert get("medattn_model_info", {"model_name": "medattn-fundus", "version": "4"}) == 0
    assert get("medattn_model_loaded") == 0


def test_errors_and_reloads_are_counted_by_their_labels(reg_metrics):
    registry, metrics = reg_metrics
    get = registry.get_sample_value
    assert get("medattn_model_reloads_total", {"outcome": "failure"}) == 0  # exported before any reload
    metrics.record_model_reload(success=False)
    metrics.record_model_reload(success=True)
    metrics.record_model_reload(success=True)
    assert get("medattn_model_reloads_total", {"outcome": "failure"}) == 1
    assert get("medattn_model_reloads_total", {"outcome": "success"}) == 2
    m.endpoint_labels.add(["/predict"])  # the service registers its route templates at start
    metrics.record_error(endpoint="/predict", http_status=422, error_type="DataError")
    assert get("medattn_errors_total", {"endpoint": "/predict", "http_status": "422", "error_type": "DataError"}) == 1


def test_module_functions_record_on_the_default_registry():
    labels = {"label": "module-level", "model_version": "99"}
    before = REGISTRY.get_sample_value("medattn_predictions_total", labels) or 0.0
    m.record_prediction(label="module-level", model_version="99", confidence=0.9, attention=np.ones((4, 4)))
    assert REGISTRY.get_sample_value("medattn_predictions_total", labels) == before + 1
    assert m.get_metrics() is m.get_metrics()


# --- exposure on BentoML's /metrics (multiprocess mode) ------------------------------------------

_PROBE_SERVICE = textwrap.dedent('''
    import sys
    import bentoml
    import numpy as np
    from starlette.testclient import TestClient
    from medattn.serving import metrics

    @bentoml.service
    class Probe:
        def __init__(self) -> None:
            metrics.set_serving_model("medattn-fundus", "7")

        @bentoml.api
        def predict(self, x: float) -> float:
            metrics.record_prediction(label="referable", model_version="7", confidence=0.8,
                                      attention=np.ones((8, 8)))
            return x

    Probe.inject_config()  # what `bentoml serve` does: BentoML's v2 config (metric namespace)
    with TestClient(Probe.to_asgi(is_main=True)) as client:
        assert client.post("/predict", json={"x": 1.0}).status_code == 200
        sys.stdout.write(client.get("/metrics").text)
''')


def test_our_metrics_and_bentomls_request_metrics_share_the_metrics_endpoint(tmp_path: Path):
    """A real BentoML ASGI app in multiprocess mode, as its workers run: one /metrics has both."""
    script = tmp_path / "probe_service.py"
    script.write_text(_PROBE_SERVICE)
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir), "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_HOME": str(tmp_path / "bentoml_home")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(done.stdout) for s in family.samples}

    def value(name: str, **labels: str) -> float | None:
        matches = [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]
        return sum(matches) if matches else None

    assert value("medattn_predictions_total", label="referable", model_version="7") == 1
    assert value("medattn_prediction_confidence_count", model_version="7") == 1
    assert value("medattn_model_info", model_name="medattn-fundus", version="7") == 1
    assert value("medattn_model_loaded") == 1
    # The names and labels the alert rules and the dashboard select on.
    assert value(m.BENTOML_REQUEST_TOTAL, endpoint="/predict", http_response_code="200") == 1
    assert value(m.BENTOML_REQUEST_DURATION + "_bucket", endpoint="/predict", le="+Inf") == 1
    assert value(m.BENTOML_REQUEST_IN_PROGRESS, endpoint="/predict") == 0


def test_endpoint_labels_are_route_templates_and_unknown_paths_one_value():
    labels = m.EndpointLabels(["/feedback", "/feedback/{feedback_id}", "/static_content/{path:path}"])
    assert labels("/feedback") == "/feedback"
    assert labels("/feedback/0b5e") == "/feedback/{feedback_id}"
    assert labels("/static_content/a/b.css") == "/static_content/{path:path}"
    for probe in ("/feedback/a/b", "/wp-admin.php", "/x\x00y", "", "/feedback/"):
        assert labels(probe) == m.UNMATCHED_ENDPOINT


def test_error_labels_never_carry_client_strings():
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry=registry)
    for i in range(50):
        metrics.record_error(endpoint=f"/random-{i}\x00", http_status=404, error_type=f"no such {i}")
    samples = [s for family in text_string_to_metric_families(
        __import__("prometheus_client").generate_latest(registry).decode()) for s in family.samples
        if s.name == "medattn_errors_total"]
    assert len(samples) == 1 and samples[0].labels == {"endpoint": "unmatched", "http_status": "404",
                                                       "error_type": "Other"}
