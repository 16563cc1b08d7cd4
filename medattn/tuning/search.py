"""``run_search``: what ``medattn tune`` and the DVC ``tune`` stage do.

1. create or resume the study (its storage, its name) and its MLflow parent run;
2. run the workers: in this process for one, else N local processes (a GPU each where there are GPUs);
3. unless ``report=False`` (extra workers on other hosts), write the report
   (``medattn.tuning.report``) and log it to the parent run, which then reads FINISHED.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medattn.config import Params
from medattn.tuning.storage import redact
from medattn.tuning.study import StudyRef, finished_count, open_study, run_worker, study_ref


@dataclass(frozen=True)
class SearchRequest:
    params: Params
    params_path: Path  # worker processes load the same file
    dataset_dir: Path
    report_dir: Path
    checkpoint_dir: Path  # where the default journal file lives (kept across DVC reruns)
    workers: Optional[int] = None  # None: tune.workers
    storage: Optional[str] = None  # None: $MEDATTN_TUNE_STORAGE, tune.storage, the journal file
    study_name: Optional[str] = None
    report: bool = True
    progress: bool = True


@dataclass(frozen=True)
class SearchOutcome:
    ref: StudyRef
    parent_run_id: str
    summary: Optional[dict[str, Any]]


def run_search(request: SearchRequest) -> SearchOutcome:
    from medattn.registry import resolve_tracking_uri
    from medattn.training.run import data_fingerprint
    from medattn.tuning.space import parse_search_space
    from medattn.tuning.tracking import parent_tracking
    from medattn.tuning.workers import cuda_device_count, launch_workers, worker_command, worker_environments

    params = request.params
    parse_search_space(params.tune.space, params.train)  # the cut-off range vs train.epochs, before any work
    ref = study_ref(params, data_fingerprint(request.dataset_dir), request.checkpoint_dir,
                    request.storage, request.study_name)
    study = open_study(ref, params)
    uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    tracking = parent_tracking(study, params.flat(), uri, params.mlflow.experiment,
                               tags={"optuna.storage": redact(ref.storage.location)})
    workers = request.workers or params.tune.workers
    print(f"study {ref.name} in {redact(ref.storage.location)}: {finished_count(study)}/{params.tune.n_trials} "
          f"trials finished; {workers} worker(s)", file=sys.stderr)
    try:
        if workers == 1:
            run_worker(params, request.dataset_dir, ref, progress=request.progress)
        else:
            commands = [worker_command(request.params_path, request.dataset_dir, ref.storage.location, ref.name, i)
                        for i in range(workers)]
            bar = _bar(params.tune.n_trials, finished_count(study), request.progress)
            launch_workers(commands, worker_environments(workers, os.environ, cuda_device_count()),
                           on_poll=(lambda: _advance(bar, study, params.tune.n_trials)) if bar else None)
            if bar is not None:
                _advance(bar, study, params.tune.n_trials)
                bar.close()
        summary = None
        if request.report:
            from medattn.tuning.report import write_study_report

            summary = write_study_report(study, params.tune.objectives, request.report_dir)
            report_files = [request.report_dir / name for name in
                            ("best_params.yaml", "best.json", "trials.csv", "candidates.yaml")]
            metrics = {k: v for k, v in summary.items() if k.startswith("best_")}
            metrics.update({f"trials_{state}": n for state, n in summary["trials"].items()})
            tracking.log_study_artifacts([*report_files, request.report_dir / "figures"], metrics)
            tracking.finish_parent()
    except BaseException:
        tracking.finish_parent("KILLED")  # resumable: the next run sets it RUNNING again
        raise
    return SearchOutcome(ref, tracking.parent_run_id, summary)


def _bar(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(done, total), desc="tune", unit="trial")


def _advance(bar, study, total: int) -> None:
    bar.n = min(finished_count(study), total)
    bar.refresh()
