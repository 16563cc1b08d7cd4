"""Local worker processes of one study, each with its own GPU on a GPU host.

``medattn tune --workers N`` starts N processes of ``python -m medattn.tuning.workers`` that
share the study through its storage. On a host with CUDA, worker *i* sees only GPU
``i mod device_count`` (``CUDA_VISIBLE_DEVICES``; within an existing ``CUDA_VISIBLE_DEVICES``
list, its i-th entry round-robin), so ``train.device: auto`` puts each worker on its own card;
on a CPU host nothing is set. Several workers per GPU (N > GPUs) share cards, which pays for
small models that leave a GPU mostly idle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from medattn.errors import MedattnError

CUDA_ENV = "CUDA_VISIBLE_DEVICES"
#: how often the launcher looks at its workers (and moves the progress bar)
POLL_SECONDS = 2.0


class WorkerFailed(MedattnError):
    """A worker process exited non-zero (its own message is above, on its stderr)."""


def gpu_assignments(workers: int, device_count: int, visible: Optional[str]) -> list[Optional[str]]:
    """``CUDA_VISIBLE_DEVICES`` per worker: round-robin over the host's GPUs, None on a CPU host."""
    if device_count <= 0:
        return [None] * workers
    listed = [entry.strip() for entry in visible.split(",") if entry.strip()] if visible else []
    names = listed[:device_count] if listed else [str(i) for i in range(device_count)]
    return [names[i % len(names)] for i in range(workers)]


def worker_environments(workers: int, base: Mapping[str, str], device_count: int) -> list[dict[str, str]]:
    envs = []
    for index, gpu in enumerate(gpu_assignments(workers, device_count, base.get(CUDA_ENV))):
        env = dict(base)
        if gpu is not None:
            env[CUDA_ENV] = gpu
        env["MEDATTN_TUNE_WORKER"] = str(index)
        envs.append(env)
    return envs


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_command(params_path: Path, dataset_dir: Path, storage: str, study_name: str, index: int) -> list[str]:
    return [sys.executable, "-m", "medattn.tuning.workers", "--params", str(params_path), "--data", str(dataset_dir),
            "--storage", storage, "--study-name", study_name, "--worker-index", str(index)]


def launch_workers(commands: Sequence[list[str]], envs: Sequence[Mapping[str, str]],
                   on_poll: Optional[Callable[[], None]] = None) -> None:
    """Run the worker processes to the end; any non-zero exit is a WorkerFailed naming it.

    Ctrl-C stops every worker (their running trials are retried by the next search).
    """
    processes = [subprocess.Popen(command, env=dict(env)) for command, env in zip(commands, envs, strict=True)]
    try:
        while any(p.poll() is None for p in processes):
            time.sleep(POLL_SECONDS)
            if on_poll is not None:
                on_poll()
    except BaseException:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    failed = [(i, p.returncode) for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        described = ", ".join(f"worker {i} exited {code}" for i, code in failed)
        raise WorkerFailed(f"{described} (its error is printed above); the study keeps every finished trial: "
                           "run the same command again to resume")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """One worker: ``python -m medattn.tuning.workers --params ... --data ... --storage ... --study-name ...``."""
    from medattn.config import load_params
    from medattn.tuning.storage import StorageSettings
    from medattn.tuning.study import StudyRef, run_worker

    parser = argparse.ArgumentParser(description="one worker of a medattn study (started by `medattn tune`)")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--storage", required=True, help="journal file path or RDB URL")
    parser.add_argument("--study-name", required=True)
    parser.add_argument("--worker-index", type=int, default=int(os.environ.get("MEDATTN_TUNE_WORKER", "0")))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    t = params.tune
    ref = StudyRef(StorageSettings(args.storage, t.heartbeat_seconds, t.grace_seconds, t.max_retry), args.study_name)
    ran = run_worker(params, args.data, ref, worker_index=args.worker_index)
    print(f"worker {args.worker_index}: ran {ran} trial(s) of study {args.study_name}", file=sys.stderr)


if __name__ == "__main__":
    from medattn.stage import run_stage

    run_stage(main)
