"""Trial packing: several small runs (search trials, protocol repeats) train at once on one device.

One small-data trial leaves a large GPU mostly idle: its kernels are tiny and the host spends
its time launching them. :func:`fit_packed` trains P runs *in turn, one optimiser step each*,
every run on its own CUDA stream, so the kernels of one run execute while the host launches the
next run's; the fast path (``train.fast_path``) keeps the host from waiting on the GPU inside an
epoch, and the runs share one device-held copy of the data.

Each run is an ordinary :class:`medattn.training.fit.TrainingRun` (the one loop) with its own
random-number state, swapped in for each of its steps, so a packed run draws the same batches,
dropout and initial weights as the same run trained alone by :func:`fit`: on the CPU the
histories and weights are identical to the bit (tested); on CUDA they are what ``fit`` gives,
up to the non-determinism CUDA kernels already have.

Why not one stacked model (``torch.func.stack_module_state`` + ``vmap``)? It would need every
run to have the same architecture *and the same phase* (Algorithm 1's freeze is a branch on a
per-run flag, E differs between trials), dropout under ``vmap`` draws other numbers than a run
alone, BatchNorm's running statistics need patching, and Adam with per-trial lr and weight decay
would be a second optimiser to maintain. Streams keep every run an ordinary ``fit``.

Streams overlap only where the host does not wait: the CPU has no streams, so there the runs
simply alternate (same total work, no speed-up); that is what the CPU tests check.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from medattn.config import ModelParams, TrainParams
from medattn.errors import ParamError
from medattn.training.fit import (
    EpochCallback,
    LabelledImages,
    SplitCache,
    TrainingRun,
    TrainResult,
    make_deterministic,
)

#: what a packed run ends with: its result, or the exception its ``on_epoch`` (or a step) raised
PackedOutcome = Union[TrainResult, Exception]


@dataclass
class _PackedRun:
    run: TrainingRun
    cpu_rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor]
    stream: Optional["torch.cuda.Stream"]
    steps: Optional[Iterator[bool]] = None
    outcome: Optional[PackedOutcome] = None

    def advance(self) -> bool:
        """One step of this run under its own random state and stream; True when an epoch ended."""
        device = self.run.device
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        try:
            with context:
                assert self.steps is not None
                return bool(next(self.steps))
        finally:
            self.cpu_rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(device)


def _per_run(value, count: int, what: str) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ParamError(f"fit_packed: {count} train params but {len(value)} {what}")
    return list(value)


def fit_packed(
    model_params: Union[ModelParams, Sequence[ModelParams]],
    train_params: Sequence[TrainParams],
    train: LabelledImages,
    val: LabelledImages,
    *,
    class_names: list[str],
    on_epoch: Union[None, EpochCallback, Sequence[Optional[EpochCallback]]] = None,
    checkpoint_dirs: Optional[Sequence[Optional[Path]]] = None,
    data_fingerprint: str = "",
    progress: bool = True,
) -> list[PackedOutcome]:
    """Train one run per ``train_params`` entry at once (one ``model_params`` for all, or one each).

    Returns one outcome per run, in order: its :class:`TrainResult`, or the exception it raised
    (an ``optuna.TrialPruned`` from its ``on_epoch``, say), so that one pruned or failed trial
    does not stop the others. ``on_epoch`` returning True stops that run only.
    """
    train_params = list(train_params)
    if not train_params:
        raise ParamError("fit_packed needs at least one set of train params")
    count = len(train_params)
    models = _per_run(model_params, count, "model params")
    callbacks = _per_run(on_epoch, count, "on_epoch callbacks")
    checkpoints = _per_run(checkpoint_dirs, count, "checkpoint dirs")
    make_deterministic()
    cache: SplitCache = {}
    packed: list[_PackedRun] = []
    for mp, tp, callback, checkpoint in zip(models, train_params, callbacks, checkpoints, strict=True):
        run = TrainingRun(mp, tp, train, val, class_names=class_names, on_epoch=callback,
                          checkpoint_dir=checkpoint, data_fingerprint=data_fingerprint, progress=False,
                          split_cache=cache)
        cuda = run.device.type == "cuda"
        packed.append(_PackedRun(
            run=run, cpu_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(run.device) if cuda else None,
            stream=torch.cuda.Stream(run.device) if cuda else None,
        ))
    _synchronize(packed)  # set-up ran on the default stream; each run continues on its own
    for item in packed:
        item.steps = item.run.steps()

    total = sum(item.run.train_params.epochs - item.run.resumed_from for item in packed)
    bar = tqdm(total=total, desc=f"train x{count}", unit="epoch", disable=not progress)
    active = list(packed)
    while active:
        for item in list(active):
            try:
                if item.advance():
                    bar.update(1)
            except StopIteration:
                active.remove(item)
            except Exception as exc:  # noqa: BLE001 - the run's outcome; the other runs go on
                item.outcome = exc
                active.remove(item)
    bar.close()
    _synchronize(packed)
    for item in packed:
        if item.outcome is None:
            item.outcome = item.run.result()
    return [item.outcome for item in packed]  # type: ignore[misc]


def _synchronize(packed: list[_PackedRun]) -> None:
    for device in {item.run.device for item in packed if item.run.device.type == "cuda"}:
        torch.cuda.synchronize(device)


__all__ = ["PackedOutcome", "fit_packed"]
