"""A study: created or resumed in its storage, searched by one worker, summed up when done.

* :func:`open_study` creates the study (seeded TPE, a median pruner for one objective) or loads
  it: the same name in the same storage *is* the same study, so a killed search resumes.
* :func:`run_worker` trains trials until the study holds ``n_trials`` complete or pruned
  trials, whoever ran them (other processes, other hosts). Its sampler is seeded with
  ``tune.seed + worker_index``: one worker draws a reproducible sequence, and N workers do not
  all draw the same first points.
* The study's name, unless ``tune.study_name`` sets it, is derived from the data and every
  param that changes a trial's result, so changed params start a fresh study instead of
  mixing trials of two searches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import optuna
from optuna.trial import TrialState

from medattn.config import Params
from medattn.errors import MedattnError
from medattn.training.checkpoints import fingerprint
from medattn.tuning.storage import StorageSettings, fail_stale_trials_now, open_storage, redact

log = logging.getLogger(__name__)

STORAGE_ENV = "MEDATTN_TUNE_STORAGE"
JOURNAL_FILE = "study.journal"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: a worker gives up after this many trials in a row failed (a broken setup, not bad luck)
MAX_CONSECUTIVE_FAILURES = 3


class TuneError(MedattnError):
    """The search cannot go on (every trial failing, no trial finished)."""


@dataclass(frozen=True)
class StudyRef:
    """Which study, where: all a worker on any host needs besides params and data."""

    storage: StorageSettings
    name: str


def storage_location(params: Params, checkpoint_dir: Path, override: Optional[str] = None) -> str:
    """``--storage``, else ``$MEDATTN_TUNE_STORAGE`` (keeps a password out of params.yaml), else
    ``tune.storage``, else the journal file ``<checkpoint_dir>/study.journal``."""
    for candidate in (override, os.environ.get(STORAGE_ENV), params.tune.storage):
        if candidate and candidate.strip():
            return candidate.strip()
    return str(checkpoint_dir / JOURNAL_FILE)


def derived_study_name(params: Params, data_fingerprint: str) -> str:
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k != "device"}
    tune = params.tune
    key = fingerprint(data_fingerprint, dataclasses.asdict(params.model), train, tune.space, tune.objectives,
                      tune.seed, dataclasses.asdict(tune.pruner), params.evaluate.topk_percent)
    return f"medattn-{key[:12]}"


def study_ref(params: Params, data_fingerprint: str, checkpoint_dir: Path, storage: Optional[str] = None,
              study_name: Optional[str] = None) -> StudyRef:
    t = params.tune
    settings = StorageSettings(storage_location(params, checkpoint_dir, storage), t.heartbeat_seconds,
                               t.grace_seconds, t.max_retry)
    name = study_name or t.study_name or derived_study_name(params, data_fingerprint)
    return StudyRef(settings, name)


def open_study(ref: StudyRef, params: Params, worker_index: int = 0) -> optuna.Study:
    """Create or load the study; a study of the same name with other objectives is an error."""
    t = params.tune
    directions = ["maximize"] * len(t.objectives)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=t.seed + worker_index,
                                             n_startup_trials=max(1, min(10, t.n_trials // 3)))
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=t.pruner.n_startup_trials, n_warmup_steps=t.pruner.n_warmup_steps)
        if len(directions) == 1 else optuna.pruners.NopPruner())
    storage = open_storage(ref.storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=ref.name, directions=directions, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise TuneError(f"study {ref.name!r} in {redact(ref.storage.location)} has {len(study.directions)} "
                        f"objective(s), tune.objectives has {len(directions)}: use another tune.study_name")
    return study


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_worker(params: Params, dataset_dir: Path, ref: StudyRef, *, worker_index: int = 0,
               progress: bool = False) -> int:
    """Train trials until the study has ``tune.n_trials`` finished ones; returns how many this worker ran."""
    from medattn.registry import resolve_tracking_uri
    from medattn.tuning.objective import Objective, load_trial_data
    from medattn.tuning.space import parse_search_space
    from medattn.tuning.tracking import attached_tracking

    space = parse_search_space(params.tune.space, params.train)
    study = open_study(ref, params, worker_index)
    fail_stale_trials_now(study)
    tracking = attached_tracking(study, resolve_tracking_uri(params.mlflow.tracking_uri), params.mlflow.experiment)
    data = load_trial_data(dataset_dir, "attention_mass_ratio" in params.tune.objectives)
    objective = Objective(params, space, data, tracking)
    catch = (MedattnError, _out_of_memory_error())
    ran, failures_in_a_row = 0, 0
    bar = _progress_bar(params.tune.n_trials, finished_count(study), progress)
    # One trial per optimize call: the count is checked before each trial, so this worker never
    # starts a trial the study no longer needs (several workers may still overshoot by one each).
    while finished_count(study) < params.tune.n_trials:
        study.optimize(objective, n_trials=1, catch=catch, gc_after_trial=True)
        ran += 1
        state = _last_state_of(study, objective)
        failures_in_a_row = failures_in_a_row + 1 if state == TrialState.FAIL else 0
        if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            raise TuneError(f"study {ref.name!r}: {failures_in_a_row} trials in a row failed, the last with: "
                            f"{objective.last_failure or 'see the worker log'}")
        if bar is not None:
            bar.n = min(finished_count(study), params.tune.n_trials)
            bar.refresh()
    if bar is not None:
        bar.close()
    return ran


def _last_state_of(study: optuna.Study, objective) -> Optional[TrialState]:
    number = objective.last_trial_number
    if number is None:
        return None
    trials = study.get_trials(deepcopy=False)  # ordered by number
    return trials[number].state if number < len(trials) else None


def _out_of_memory_error() -> type[Exception]:
    import torch

    return torch.OutOfMemoryError


def _progress_bar(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(done, total), desc="tune", unit="trial")
