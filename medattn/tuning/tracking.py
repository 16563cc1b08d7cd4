"""MLflow for a study: one parent run per study, a nested run per trial, the study's plots.

The parent run's id is kept in the study itself (a user attribute), so every worker, on this
machine or another, nests its trial runs under the same parent, and a resumed study goes on
logging into it. A trial run holds the trial's params, its per-epoch curves (``step = epoch``)
and a ``state`` tag: ``complete``, ``pruned`` or ``failed`` (a trial whose worker was killed is
tagged ``failed`` when its retry starts). All calls go through a client bound to one URI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from medattn.errors import RegistryError

PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the trial runs under the parent
STATE_TAG = "state"
T = TypeVar("T")


def _with_retry(call: Callable[[], T], attempts: int = 6) -> T:
    """Retry a tracking call that met a busy SQLite database: several workers write to one file."""
    for attempt in range(attempts):
        try:
            return call()
        except RegistryError as exc:
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class StudyTracking:
    tracking_uri: str
    experiment: str
    parent_run_id: str

    def _client(self):
        from medattn.registry._mlflow import client_for

        return client_for(self.tracking_uri)

    def start_trial_run(self, trial_number: int, values: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from medattn.registry import start_pipeline_run

        run_tags = {PARENT_TAG: self.parent_run_id, "optuna.trial_number": str(trial_number), **tags}
        return _with_retry(lambda: start_pipeline_run(dict(values), self.experiment, self.tracking_uri,
                                                      run_name=f"trial-{trial_number}", tags=run_tags))

    def log_epoch(self, run_id: str, row: Mapping[str, float]) -> None:
        from medattn.registry import log_epoch_metrics

        _with_retry(lambda: log_epoch_metrics(run_id, [row], self.tracking_uri))

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        from medattn.registry import log_metrics

        _with_retry(lambda: log_metrics(run_id, metrics, self.tracking_uri))

    def end_trial_run(self, run_id: str, state: str) -> None:
        """``state``: complete | pruned | failed (pruning is a normal end: the run is FINISHED)."""
        from medattn.registry import end_run
        from medattn.registry._mlflow import mlflow_errors

        def finish() -> None:
            with mlflow_errors(self.tracking_uri):
                self._client().set_tag(run_id, STATE_TAG, state)
            end_run(run_id, self.tracking_uri, status="FAILED" if state == "failed" else "FINISHED")

        _with_retry(finish)

    def log_study_artifacts(self, paths: Sequence[Path], metrics: Mapping[str, Any]) -> None:
        from medattn.registry import log_artifacts, log_metrics

        _with_retry(lambda: log_metrics(self.parent_run_id, metrics, self.tracking_uri))
        _with_retry(lambda: log_artifacts(self.parent_run_id, [p for p in paths if p.exists()], self.tracking_uri,
                                          artifact_dir="tune"))

    def finish_parent(self, status: str = "FINISHED") -> None:
        from medattn.registry import end_run

        _with_retry(lambda: end_run(self.parent_run_id, self.tracking_uri, status=status))


def parent_tracking(study, params_flat: Mapping[str, Any], tracking_uri: str, experiment: str,
                    tags: Optional[Mapping[str, str]] = None) -> StudyTracking:
    """The study's parent run: the one recorded in the study, else a new one (recorded there)."""
    from medattn.registry import start_pipeline_run
    from medattn.registry._mlflow import mlflow_errors

    existing = study.user_attrs.get(PARENT_RUN_ATTR)
    if existing:
        tracking = StudyTracking(tracking_uri, experiment, existing)
        with mlflow_errors(tracking_uri):
            # a resumed study: the parent is RUNNING again while workers log under it
            _with_retry(lambda: tracking._client().update_run(existing, status="RUNNING"))
        return tracking
    run_tags = {"stage": "tune", "optuna.study": study.study_name, **(tags or {})}
    run_id = _with_retry(lambda: start_pipeline_run(dict(params_flat), experiment, tracking_uri,
                                                    run_name=f"study-{study.study_name}", tags=run_tags))
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return StudyTracking(tracking_uri, experiment, run_id)


def attached_tracking(study, tracking_uri: str, experiment: str) -> StudyTracking:
    """A worker's view: the parent run its launcher recorded in the study."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not run_id:
        raise RegistryError(f"study {study.study_name!r} has no MLflow parent run: start it with `medattn tune` "
                            "(which creates the study and its parent run) before adding workers")
    return StudyTracking(tracking_uri, experiment, run_id)
