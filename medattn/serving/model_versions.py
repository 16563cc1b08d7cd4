"""Any registered version, not only the champion: its history with figures, and its predictions.

The review page compares the champion's attention map with the challenger's on the same image and
lists every registered version with its aliases and metrics before an expert accepts or rolls
back. The model runner holds only the champion (and batches for it), so a comparison loads the
asked-for version here, in the API worker: :class:`VersionPredictors` keeps the last few loaded
(versions are immutable, so a cached copy never goes stale) and downloads into the service's
model cache exactly like the runner does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medattn.errors import RegistryError
from medattn.registry._mlflow import client_for, mlflow_errors
from medattn.registry.aliases import champion_history
from medattn.registry.lookup import DEFAULT_METRIC, metric_of, quoted, require_model, version_number

# Run metrics shown per version; everything else the run logged stays in MLflow.
_HISTORY_TAGS = ("gate_reason", "rolled_back", "parent_version", "eligible", "feedback_ids")


@dataclass(frozen=True)
class VersionEntry:
    """One registered version as the review page's model history lists it."""

    version: str
    aliases: tuple[str, ...]
    created_ms: int
    run_id: str | None
    metric: float | None
    metrics: dict[str, float]
    tags: dict[str, str]
    was_champion: bool

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "aliases": list(self.aliases), "created_ms": self.created_ms,
                "run_id": self.run_id, "metric": self.metric, "metrics": self.metrics, "tags": self.tags,
                "was_champion": self.was_champion}


def model_history(model_name: str, tracking_uri: str, metric_key: str = DEFAULT_METRIC) -> dict[str, Any]:
    """Every version of ``model_name``, newest first, with aliases, run metrics and lifecycle tags."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        require_model(client, model_name)
        history = champion_history(client, model_name)
        # search results carry no aliases (MLflow fills them only on single-version reads)
        aliases_of: dict[str, list[str]] = {}
        for alias, number in client.get_registered_model(model_name).aliases.items():
            aliases_of.setdefault(str(number), []).append(alias)
        entries = []
        for found in client.search_model_versions(f"name = {quoted(model_name)}"):
            metrics: dict[str, float] = {}
            if found.run_id:
                try:
                    metrics = {k: float(v) for k, v in client.get_run(found.run_id).data.metrics.items()}
                except MlflowException:
                    metrics = {}  # run deleted: the version is still listed, unmeasured
            number = version_number(found)
            entries.append(VersionEntry(
                version=number, aliases=tuple(sorted(aliases_of.get(number, []))),
                created_ms=int(found.creation_timestamp or 0),
                run_id=found.run_id or None, metric=metric_of(client, found, metric_key), metrics=metrics,
                tags={k: str(v) for k, v in found.tags.items() if k in _HISTORY_TAGS},
                was_champion=number in history))
    entries.sort(key=lambda e: int(e.version), reverse=True)
    return {"model_name": model_name, "metric_key": metric_key, "champion_history": history,
            "versions": [e.to_dict() for e in entries]}


class VersionPredictors:
    """Loaded predictors of named versions (number or alias), the ``keep`` most recently used."""

    def __init__(self, model_name: str, tracking_uri: str, cache_dir: Path, device: str = "cpu",
                 keep: int = 3) -> None:
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.keep = keep
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, alias_or_version: str):
        """The :class:`~medattn.serving.inference.Predictor` of a version; RegistryError if unknown.

        An alias is resolved on every call (it moves on promote / rollback); the model behind
        the version number it names is loaded once.
        """
        from medattn.registry import download_model_version, get_model_version_info
        from medattn.serving.inference import ModelRef, Predictor

        key = str(alias_or_version).strip()
        if not key:
            raise RegistryError("registry: an empty model version or alias")
        with self._lock:
            info = get_model_version_info(self.model_name, key, tracking_uri=self.tracking_uri)
            held = self._loaded.get(info.version)
            if held is None:
                bundle_dir, info = download_model_version(self.model_name, info.version, dst=self.cache_dir,
                                                          tracking_uri=self.tracking_uri)
                held = Predictor.from_bundle(bundle_dir, ModelRef(info.name, info.version), self.device)
                self._loaded[info.version] = held
            self._loaded.move_to_end(info.version)
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return held
