"""Prometheus metrics of the medattn service, exposed on BentoML's own ``/metrics``.

BentoML already counts and times every HTTP request (``bentoml_service_request_total`` and
``bentoml_service_request_duration_seconds``, labels ``endpoint``, ``http_response_code``,
``service_name``, ``service_version``, ``runner_name``). This module adds what only the model
knows: what it predicts, how sure it is, where its attention goes, what experts send back,
and which model is being served.

Multiprocess mode: BentoML runs each worker with ``PROMETHEUS_MULTIPROC_DIR`` set and its
``/metrics`` merges every worker's files with ``MultiProcessCollector``. A ``prometheus_client``
metric joins that merge only if the library was first imported with the variable already set,
so ``prometheus_client`` is imported when the metrics are first *created* (``get_metrics()``,
called by the service at start-up), not when this module is imported. Gauges say how workers'
values combine (``multiprocess_mode``); ``Info`` is unsupported there, so the model info is a
gauge set to 1.

Attention statistics, for drift (both computed on one (H, W) map, see the helpers):

- entropy of the map normalised to a probability distribution, divided by log(H*W) so it lies
  in [0, 1] whatever the image size: 1 = attention spread evenly, 0 = all on one pixel;
- central mass: the share of attention inside the *central field*, the disc centred on the
  image centre with radius 1/4 of the image side (the shorter side if not square). A uniform
  map puts pi/16 (about 0.196) of its mass there.

The service calls the module-level functions (``record_prediction`` ...); tests build their own
``ServingMetrics(registry=CollectorRegistry())`` and read values back from that registry.
"""

from __future__ import annotations

import math
import re
import threading
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# BentoML's built-in request metrics (namespace ``bentoml_service`` in BentoML 1.4, from
# RunnerTrafficMetricsMiddleware); the alert rules and the dashboard build on them.
BENTOML_REQUEST_TOTAL = "bentoml_service_request_total"
BENTOML_REQUEST_DURATION = "bentoml_service_request_duration_seconds"
BENTOML_REQUEST_IN_PROGRESS = "bentoml_service_request_in_progress"

# Top-class probability is at least 1/n_classes, and what matters is the high end.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# Normalised entropy of smooth maps sits close to 1, so the buckets crowd there.
ENTROPY_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)
CENTRAL_MASS_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

CENTRAL_FIELD_RADIUS_FRACTION = 0.25

# The one ``endpoint`` label value of every path no route template matches: a scanner probing
# thousands of random paths adds no series, and no client-chosen string becomes a label value.
UNMATCHED_ENDPOINT = "unmatched"
# BentoML's own routes on every service (its UI, schema, health and metrics).
BENTOML_ROUTE_TEMPLATES = ("/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json",
                           "/static_content/{path:path}")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")


class EndpointLabels:
    """Maps a request path to the route template it matched (``/feedback/{feedback_id}``).

    Only templates the service itself declares are label values; any other path is
    :data:`UNMATCHED_ENDPOINT`. So the number of ``endpoint`` values is bounded by the number
    of routes, whatever clients send.
    """

    def __init__(self, templates: Iterable[str] = ()) -> None:
        self._exact: set[str] = set()
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        self._lock = threading.Lock()
        self.add(templates)

    def add(self, templates: Iterable[str]) -> None:
        with self._lock:
            for template in templates:
                if "{" not in template:
                    self._exact.add(template)
                    continue
                pattern, start = "", 0
                for match in _PARAM.finditer(template):
                    pattern += re.escape(template[start:match.start()]) + (".*" if match.group(2) else "[^/]+")
                    start = match.end()
                pattern += re.escape(template[start:])
                if all(t != template for _, t in self._patterns):
                    self._patterns.append((re.compile(pattern), template))

    def __call__(self, path: str) -> str:
        if path in self._exact:
            return path
        for pattern, template in self._patterns:
            if pattern.fullmatch(path):
                return template
        return UNMATCHED_ENDPOINT


endpoint_labels = EndpointLabels(BENTOML_ROUTE_TEMPLATES)


def _as_map(att: np.ndarray) -> np.ndarray:
    """One attention map as a 2-D float array; (1, H, W) and (1, 1, H, W) are squeezed."""
    arr = np.asarray(att, dtype=np.float64)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size < 2:
        raise ValueError(f"attention map must be one (H, W) map of >= 2 pixels, got shape {np.shape(att)}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise ValueError("attention map must be finite and non-negative")
    return arr


def _as_distribution(arr: np.ndarray) -> np.ndarray:
    total = arr.sum()
    # An all-zero map prefers no pixel: treat it as uniform rather than undefined.
    if total <= 0:
        return np.full(arr.shape, 1.0 / arr.size)
    return arr / total


def attention_entropy(att: np.ndarray) -> float:
    """Shannon entropy of the map normalised to sum 1, divided by log(H*W): in [0, 1]."""
    return _entropy_of(_as_distribution(_as_map(att)))


def _entropy_of(distribution: np.ndarray) -> float:
    p = distribution.ravel()
    n_pixels = p.size
    p = p[p > 0]
    entropy = float(-(p * np.log(p)).sum())
    # Clamp float round-off (a uniform map can give 1 + 1e-16, a one-hot map -0.0).
    return min(max(0.0, entropy / math.log(n_pixels)), 1.0)


def central_field_mask(height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of pixels whose centre lies in the central disc of radius side/4."""
    radius = CENTRAL_FIELD_RADIUS_FRACTION * min(height, width)
    rows = np.arange(height) + 0.5 - height / 2
    cols = np.arange(width) + 0.5 - width / 2
    return rows[:, None] ** 2 + cols[None, :] ** 2 <= radius**2


def central_mass(att: np.ndarray) -> float:
    """Share of the attention mass inside the central field (see the module docstring)."""
    return _central_mass_of(_as_distribution(_as_map(att)))


def _central_mass_of(distribution: np.ndarray) -> float:
    return float(distribution[central_field_mask(*distribution.shape)].sum())


class ServingMetrics:
    """Every medattn metric in one registry; None = prometheus_client.REGISTRY, the one BentoML reads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        import prometheus_client as prom  # deferred on purpose, see the module docstring

        reg = prom.REGISTRY if registry is None else registry
        self.registry = reg
        self.predictions = prom.Counter(
            "medattn_predictions_total", "Predictions served, by predicted label and model version",
            ["label", "model_version"], registry=reg)
        self.confidence = prom.Histogram(
            "medattn_prediction_confidence", "Top-class probability of each prediction",
            ["model_version"], buckets=CONFIDENCE_BUCKETS, registry=reg)
        self.attention_entropy = prom.Histogram(
            "medattn_attention_entropy", "Entropy of the normalised attention map / log(pixels), in [0, 1]",
            ["model_version"], buckets=ENTROPY_BUCKETS, registry=reg)
        self.attention_central_mass = prom.Histogram(
            "medattn_attention_central_mass", "Share of attention inside the central disc of radius side/4",
            ["model_version"], buckets=CENTRAL_MASS_BUCKETS, registry=reg)
        self.feedback = prom.Counter(
            "medattn_feedback_total", "Expert feedback submissions, by ROI kinds drawn and label correction",
            ["roi_kinds", "label_corrected"], registry=reg)
        self.feedback_rois = prom.Counter(
            "medattn_feedback_rois_total", "Expert ROIs received, by kind", ["kind"], registry=reg)
        # The count comes from the shared feedback store, so the latest write by any live worker is right.
        self.feedback_waiting = prom.Gauge(
            "medattn_feedback_waiting", "Feedback items stored since the last recalibration",
            registry=reg, multiprocess_mode="livemostrecent")
        # max over workers: a version shows 1 while at least one worker serves it.
        self.model_info = prom.Gauge(
            "medattn_model_info", "1 for the model name and version being served",
            ["model_name", "version"], registry=reg, multiprocess_mode="livemax")
        # min over workers: 0 as soon as one worker has no model.
        self.model_loaded = prom.Gauge(
            "medattn_model_loaded", "1 when a model is loaded and serving, else 0",
            registry=reg, multiprocess_mode="livemin")
        self.errors = prom.Counter(
            "medattn_errors_total", "Requests the service answered with an error",
            ["endpoint", "http_status", "error_type"], registry=reg)
        self.model_reloads = prom.Counter(
            "medattn_model_reloads_total", "Model reloads, by outcome", ["outcome"], registry=reg)
        # Exported at 0 from the start, so increase() sees the first failure (a new series has no "before").
        for outcome in ("success", "failure"):
            self.model_reloads.labels(outcome=outcome)
        self._served: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._add_recalibration_gauges(prom, reg)

    def _add_recalibration_gauges(self, prom, reg) -> None:
        """The recalibration scheduler's state (``medattn.feedback.scheduler``), from its state file."""
        self.recalibration_running = prom.Gauge(
            "medattn_recalibration_running", "1 while a recalibration retrain runs, else 0",
            registry=reg, multiprocess_mode="livemostrecent")
        self.recalibration_last_run = prom.Gauge(
            "medattn_recalibration_last_run_timestamp_seconds", "When the last recalibration finished (Unix time)",
            registry=reg, multiprocess_mode="livemostrecent")
        self.recalibration_last_success = prom.Gauge(
            "medattn_recalibration_last_success", "1 when the last recalibration succeeded, 0 when it failed",
            registry=reg, multiprocess_mode="livemostrecent")
        self.recalibration_next_run = prom.Gauge(
            "medattn_recalibration_next_run_timestamp_seconds",
            "When the interval rule next starts a recalibration if any feedback waits (Unix time)",
            registry=reg, multiprocess_mode="livemostrecent")
        self.recalibration_pending = prom.Gauge(
            "medattn_recalibration_pending_feedback", "Feedback records no recalibration has consumed yet",
            registry=reg, multiprocess_mode="livemostrecent")
        self.recalibration_scheduler_up = prom.Gauge(
            "medattn_recalibration_scheduler_up", "1 while a `medattn scheduler` process holds its lock, else 0",
            registry=reg, multiprocess_mode="livemostrecent")

    def set_recalibration_state(self, state: dict) -> None:
        """Publish a scheduler state (``SchedulerState.to_json()``); missing times read as 0."""
        self.recalibration_running.set(1.0 if state.get("running") else 0.0)
        self.recalibration_last_run.set(float(state.get("last_run_at_unix") or 0.0))
        self.recalibration_last_success.set(1.0 if state.get("last_success") else 0.0)
        self.recalibration_next_run.set(float(state.get("next_run_at_unix") or 0.0))
        self.recalibration_pending.set(float(state.get("pending") or 0))
        self.recalibration_scheduler_up.set(1.0 if state.get("scheduler_up") else 0.0)

    def record_prediction(self, *, label: str, model_version: str, confidence: float,
                          attention: np.ndarray) -> None:
        """Count one prediction and observe its confidence and attention statistics."""
        if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
            raise ValueError(f"confidence must be a probability in [0, 1], got {confidence!r}")
        p = _as_distribution(_as_map(attention))  # validated and normalised once for both statistics
        entropy, mass = _entropy_of(p), _central_mass_of(p)
        self.predictions.labels(label=label, model_version=model_version).inc()
        self.confidence.labels(model_version=model_version).observe(confidence)
        self.attention_entropy.labels(model_version=model_version).observe(entropy)
        self.attention_central_mass.labels(model_version=model_version).observe(mass)

    def record_feedback(self, *, relevant_rois: int, irrelevant_rois: int, label_corrected: bool) -> None:
        """Count one feedback submission and the ROIs it carries."""
        if relevant_rois < 0 or irrelevant_rois < 0:
            raise ValueError("ROI counts must be >= 0")
        kinds = {(True, True): "both", (True, False): "relevant",
                 (False, True): "irrelevant", (False, False): "none"}[(relevant_rois > 0, irrelevant_rois > 0)]
        self.feedback.labels(roi_kinds=kinds, label_corrected="yes" if label_corrected else "no").inc()
        self.feedback_rois.labels(kind="relevant").inc(relevant_rois)
        self.feedback_rois.labels(kind="irrelevant").inc(irrelevant_rois)

    def set_feedback_waiting(self, count: int) -> None:
        """Feedback items stored since the last recalibration (read from the store)."""
        if count < 0:
            raise ValueError("feedback waiting count must be >= 0")
        self.feedback_waiting.set(count)

    def set_serving_model(self, model_name: str, version: str) -> None:
        """Mark (model_name, version) as served: info 1 (previous ones 0) and loaded 1."""
        with self._lock:
            # Multiprocess mode cannot remove a labelled series, so an older version drops to 0.
            for old in self._served - {(model_name, version)}:
                self.model_info.labels(model_name=old[0], version=old[1]).set(0)
            self._served.add((model_name, version))
            self.model_info.labels(model_name=model_name, version=version).set(1)
            self.model_loaded.set(1)

    def clear_serving_model(self) -> None:
        """No model is served any more (unloaded, or a load failed)."""
        with self._lock:
            for name, version in self._served:
                self.model_info.labels(model_name=name, version=version).set(0)
            self.model_loaded.set(0)

    def record_error(self, *, endpoint: str, http_status: int, error_type: str) -> None:
        """Count a request answered with an error; error_type is the exception class name.

        ``endpoint`` may be a raw path: it is reduced to its route template (or
        :data:`UNMATCHED_ENDPOINT`), and ``error_type`` to a Python identifier, so neither can
        carry a client's string.
        """
        error_type = error_type if error_type.isidentifier() and len(error_type) <= 64 else "Other"
        self.errors.labels(endpoint=endpoint_labels(endpoint), http_status=str(int(http_status)),
                           error_type=error_type).inc()

    def record_model_reload(self, *, success: bool) -> None:
        self.model_reloads.labels(outcome="success" if success else "failure").inc()


_default: ServingMetrics | None = None
_default_lock = threading.Lock()


def get_metrics() -> ServingMetrics:
    """The process-wide metrics on the default registry, created on first call."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ServingMetrics()
        return _default


def record_prediction(*, label: str, model_version: str, confidence: float, attention: np.ndarray) -> None:
    get_metrics().record_prediction(label=label, model_version=model_version,
                                    confidence=confidence, attention=attention)


def record_feedback(*, relevant_rois: int, irrelevant_rois: int, label_corrected: bool) -> None:
    get_metrics().record_feedback(relevant_rois=relevant_rois, irrelevant_rois=irrelevant_rois,
                                  label_corrected=label_corrected)


def set_feedback_waiting(count: int) -> None:
    get_metrics().set_feedback_waiting(count)


def set_serving_model(model_name: str, version: str) -> None:
    get_metrics().set_serving_model(model_name, version)


def clear_serving_model() -> None:
    get_metrics().clear_serving_model()


def record_error(*, endpoint: str, http_status: int, error_type: str) -> None:
    get_metrics().record_error(endpoint=endpoint, http_status=http_status, error_type=error_type)


def set_recalibration_state(state: dict) -> None:
    get_metrics().set_recalibration_state(state)


def record_model_reload(*, success: bool) -> None:
    get_metrics().record_model_reload(success=success)


# -- the recalibration scheduler's state, refreshed at every scrape -------------------------------

class RecalibrationStateOnScrape:
    """ASGI middleware: before ``GET /metrics`` is answered, re-read the scheduler's state.

    The scheduler is usually another process (``medattn scheduler``, a CronJob's ``medattn
    recalibrate --if-needed``), so gauges set when *it* writes would never reach this process's
    ``/metrics``. Instead, each scrape asks :func:`medattn.feedback.scheduler.current_state`
    (the state file, the locks, the feedback store) and sets the gauges from the answer, so a
    scrape sees the state as it is at that moment, a killed retrain included. ``source`` gives
    (state folder, feedback store, params.yaml's recalibration rules) of the running service; a
    failure to read is logged and the scrape still answered with the previous values.
    """

    def __init__(self, app, source=None) -> None:
        self.app = app
        self.source = source or _service_state_source

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path", "").rstrip("/") == "/metrics":
            from anyio import to_thread

            await to_thread.run_sync(self.refresh)
        await self.app(scope, receive, send)

    def refresh(self) -> None:
        import logging

        from medattn.feedback.scheduler import current_state

        try:
            state_dir, store, rules = self.source()
            set_recalibration_state(current_state(state_dir, store, rules=rules).to_json())
        except Exception as exc:  # noqa: BLE001 - a scrape must still be answered
            logging.getLogger("medattn.serving").warning("recalibration state not refreshed: %s", exc)


def _service_state_source():
    import bentoml

    backend = bentoml.get_current_service().backend
    return backend.settings.state_dir, backend.store, backend.recalibration_rules


# -- BentoML's request metrics, labelled by route template -------------------------------------

class _TemplateLabelled:
    """A labelled metric whose ``endpoint`` label is reduced to a route template first."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric

    def labels(self, *args: Any, **labels: Any) -> Any:
        if "endpoint" in labels:
            labels["endpoint"] = endpoint_labels(str(labels["endpoint"]))
        return self._metric.labels(*args, **labels)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def bound_bentoml_request_labels(route_templates: Iterable[str]) -> None:
    """Make BentoML's request metrics label ``endpoint`` by route template, never by raw path.

    BentoML 1.4's ``RunnerTrafficMetricsMiddleware`` (``bentoml_service_request_*``) labels each
    series with ``scope["path"]``, so every distinct URL a client invents - NUL bytes included -
    adds about 20 series to ``/metrics``. BentoML offers no setting for this; the middleware
    class is looked up when the service's ASGI app is built, so a subclass put in its place
    before then (at import of the service module) is the one used. Idempotent. The service's
    own API routes (``server_context.service_routes``) are added when the middleware is set up.
    """
    from bentoml._internal.server.http import instruments

    endpoint_labels.add(route_templates)
    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "medattn_bounded_labels", False):
        return

    class TemplateLabelledTrafficMetrics(base):  # type: ignore[misc, valid-type]
        medattn_bounded_labels = True

        def _setup(self, *args: Any, **kwargs: Any) -> None:
            from bentoml._internal.context import server_context

            endpoint_labels.add(server_context.service_routes)
            super()._setup(*args, **kwargs)
            for name, value in list(vars(self).items()):
                if name.startswith("metrics_") and "endpoint" in getattr(value, "_labelnames", ()):
                    setattr(self, name, _TemplateLabelled(value))

    instruments.RunnerTrafficMetricsMiddleware = TemplateLabelledTrafficMetrics
