"""``fit``: the one training entry point (train stage, Optuna search, protocol runner, recalibration).

The loop knows the attention-model contract only through its hooks (``medattn.models.base``),
so one loop trains every registered method. For seed 001's global map the hooks are
Algorithm 1:

    for epoch = 1..E:        optimise the image CNN and the pixel CNN together
    for epoch = E+1..epochs: fix the pixel CNN (M computed once), optimise the image CNN only

Adam with learning rate / weight decay from params, mini-batches of ``batch_size``. Each epoch
ends with a validation pass and a resumable checkpoint; the model kept is the epoch with the
best validation macro-F1 (ties: the later epoch, which has seen more data).

What consumers plug in:

* ``on_epoch(row)``: each epoch's metrics (MLflow logging; Optuna's ``trial.report``). Returning
  ``True`` stops training after that epoch (the best epoch so far is kept); raising (e.g.
  ``optuna.TrialPruned``) aborts the run.
* ``init_from``: fine-tune from given weights (a bundle folder or a state dict): recalibration.
* ``extra_loss(model, step)``: more loss terms on each training batch (the feedback loss).

Deterministic on CPU: the same data, params and thread count give identical weights (seeded
init, per-epoch seeded batch order and dropout, deterministic algorithms, fixed thread count).

``train.fast_path`` (``medattn.training.fast_path``; on by default on CUDA, off on the CPU) runs
the same steps with the splits held on the device, bf16 autocast and channels_last: the same
kind of result, not the same bits. :class:`TrainingRun` is the loop, advanced step by step, so
that ``medattn.training.packing.fit_packed`` can train several runs at once with this same code.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from tqdm.auto import tqdm

from medattn.config import ModelParams, TrainParams
from medattn.devices import resolve_device
from medattn.errors import ModelError
from medattn.models.base import AttentionModel, EpochSchedule, LossSettings
from medattn.models.factory import ModelSpec, create_model, spec_for_training
from medattn.training.checkpoints import TrainingState, fingerprint, load_state, save_state
from medattn.training.fast_path import DeviceSplit, FastPath, prepare_model, resolve_fast_path
from medattn.training.losses import total_loss

#: CPU threads used by training when ``MEDATTN_TRAIN_THREADS`` is unset: fixed, so that a
#: run's floating-point reduction order (and hence its weights) does not depend on the machine.
DEFAULT_TRAIN_THREADS = 2


@dataclass
class LabelledImages:
    """A split held in memory: normalised images (N, C, H, W) float32 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class TrainStep:
    """One training batch as ``extra_loss`` sees it."""

    epoch: int
    indices: torch.Tensor  # positions of the batch's images in the training split
    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    attention: torch.Tensor


EpochCallback = Callable[[dict[str, float]], Optional[bool]]
ExtraLoss = Callable[[nn.Module, TrainStep], Mapping[str, torch.Tensor]]
InitFrom = Union[str, Path, Mapping[str, torch.Tensor]]


@dataclass
class TrainResult:
    model: AttentionModel
    spec: ModelSpec
    history: list[dict[str, float]]
    best_epoch: int
    resumed_from_epoch: int
    stopped_early: bool = False

    @property
    def best_row(self) -> dict[str, float]:
        """The history row of the kept (best validation macro-F1) epoch."""
        return self.history[self.best_epoch - 1] if self.best_epoch else self.history[-1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_deterministic() -> int:
    """Fix the thread count and ask torch for deterministic kernels; returns the thread count."""
    threads = int(os.environ.get("MEDATTN_TRAIN_THREADS", DEFAULT_TRAIN_THREADS))
    torch.set_num_threads(max(1, threads))
    # warn_only: a CUDA op without a deterministic kernel warns instead of failing the run
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.get_num_threads()


def _batches(n: int, batch_size: int, generator: Optional[torch.Generator]) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def evaluate_split(model: AttentionModel, split: LabelledImages, batch_size: int, device: torch.device,
                   settings: LossSettings = LossSettings()) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of ``model`` on a split (eval mode)."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    preds: list[np.ndarray] = []
    for idx in _batches(len(split.labels), batch_size, None):
        x, y = split.images[idx].to(device), split.labels[idx].to(device)
        logits, attention = model(x)
        terms = total_loss(logits, y, model.loss_terms(attention, settings))
        loss_sum += float(terms["total"]) * len(idx)
        p = logits.argmax(dim=1)
        correct += int((p == y).sum())
        total += len(idx)
        preds.append(p.cpu().numpy())
    y_pred = np.concatenate(preds) if preds else np.array([], dtype=int)
    macro_f1 = float(f1_score(split.labels.numpy(), y_pred, average="macro", zero_division=0)) if total else 0.0
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1), "macro_f1": macro_f1}


def build_spec(model_params: ModelParams, class_names: list[str], train: LabelledImages) -> ModelSpec:
    n, c, h, w = train.images.shape
    spec = ModelSpec(
        backbone=model_params.backbone,
        attention=model_params.attention,
        num_classes=len(class_names),
        image_size=h,
        class_names=tuple(class_names),
        in_channels=c,
        K=model_params.K,
        pixel_rank=model_params.pixel_rank,
        imagenet_pretrained=model_params.pretrained_weights is not None,
    )
    return spec_for_training(spec, train.images)


def _initial_model(model_params: ModelParams, class_names: list[str], train: LabelledImages,
                   init_from: Optional[InitFrom]) -> tuple[AttentionModel, ModelSpec]:
    """A fresh model from params, or one rebuilt from ``init_from`` (a bundle or a state dict)."""
    if isinstance(init_from, (str, Path)):
        from medattn.models.bundle import load_bundle

        model, spec = load_bundle(Path(init_from))
        if list(spec.class_names) != list(class_names):
            raise ModelError(f"init_from {init_from}: its classes {list(spec.class_names)} differ from the "
                             f"training data's {list(class_names)}")
        if spec.image_size != train.images.shape[-1] or spec.in_channels != train.images.shape[1]:
            raise ModelError(f"init_from {init_from}: it takes {spec.in_channels}x{spec.image_size}px images, "
                             f"the training data is {train.images.shape[1]}x{train.images.shape[-1]}px")
        return model, spec
    spec = build_spec(model_params, class_names, train)
    model = create_model(spec, model_params.pretrained_weights)
    if init_from is not None:
        try:
            model.load_state_dict(dict(init_from))
        except RuntimeError as exc:
            from medattn.errors import first_line

            raise ModelError(f"init_from: the given weights do not fit {spec.backbone}+{spec.attention}: "
                             f"{first_line(exc)}") from exc
    return model, spec


class _HostSplit:
    """The plain path's batches: gathered on the host, copied to the device per step."""

    def __init__(self, split: LabelledImages, device: torch.device):
        self.split, self.device = split, device

    def __len__(self) -> int:
        return len(self.split.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.images[indices].to(self.device), self.split.labels[indices].to(self.device)


BatchSource = Union[_HostSplit, DeviceSplit]
#: device splits shared by the runs of one packed call: (id of the split, device, channels_last) -> split
SplitCache = dict[tuple[int, str, bool], DeviceSplit]


def _batch_source(split: LabelledImages, device: torch.device, fast: FastPath,
                  cache: Optional[SplitCache]) -> BatchSource:
    if not fast.enabled:
        return _HostSplit(split, device)
    key = (id(split), str(device), fast.channels_last)
    if cache is not None and key in cache:
        return cache[key]
    source = DeviceSplit(split.images, split.labels, device, fast.channels_last)
    if cache is not None:
        cache[key] = source
    return source


@torch.no_grad()
def _evaluate_fast(model: AttentionModel, source: DeviceSplit, batch_size: int, device: torch.device,
                   settings: LossSettings, fast: FastPath) -> dict[str, float]:
    """:func:`evaluate_split` on a device-held split: one host read at the end, not one per batch."""
    model.eval()
    n = len(source)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    preds: list[torch.Tensor] = []
    for idx in _batches(n, batch_size, None):
        x, y = source.batch(idx)
        with fast.autocast(device):
            logits, attention = model(x)
            terms = total_loss(logits, y, model.loss_terms(attention, settings))
        loss_sum += terms["total"].detach().double() * len(idx)
        preds.append(logits.argmax(dim=1))
    if not n:
        return {"loss": 0.0, "acc": 0.0, "macro_f1": 0.0}
    y_pred = torch.cat(preds).cpu().numpy()
    y_true = source.labels.cpu().numpy()
    return {"loss": float(loss_sum) / n, "acc": float((y_pred == y_true).mean()),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


class TrainingRun:
    """One run of the loop, advanced one optimiser step at a time.

    :func:`fit` drives one run to its end; :func:`medattn.training.packing.fit_packed` drives
    several in turn on one device. Either way the same code below trains them: there is one loop.
    ``steps()`` yields after every optimiser step (``False``) and after every finished epoch
    (``True``); an exception from ``on_epoch`` (e.g. ``optuna.TrialPruned``) comes out of it.
    """

    def __init__(
        self,
        model_params: ModelParams,
        train_params: TrainParams,
        train: LabelledImages,
        val: LabelledImages,
        *,
        class_names: list[str],
        on_epoch: Optional[EpochCallback] = None,
        init_from: Optional[InitFrom] = None,
        extra_loss: Optional[ExtraLoss] = None,
        checkpoint_dir: Optional[Path] = None,
        data_fingerprint: str = "",
        progress: bool = True,
        split_cache: Optional[SplitCache] = None,
    ):
        tp = self.train_params = train_params
        self.device = device = resolve_device(tp.device)
        self.fast = fast = resolve_fast_path(tp.fast_path, device)
        seed_everything(tp.seed)
        model, self.spec = _initial_model(model_params, class_names, train, init_from)
        self.model = model = prepare_model(model.to(device), fast)
        model.before_training(train.images)
        self.settings = LossSettings(lambda_l1=tp.lambda_l1)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
        self.on_epoch, self.extra_loss, self.checkpoint_dir = on_epoch, extra_loss, checkpoint_dir
        self.progress = progress
        self.train_source = _batch_source(train, device, fast, split_cache)
        self.val_source = _batch_source(val, device, fast, split_cache)

        init_key = (init_from if isinstance(init_from, (str, Path))
                    else ("state_dict" if init_from is not None else None))
        run_id = fingerprint(model_params.__dict__, _fingerprinted(tp), class_names, data_fingerprint, str(init_key))
        state = load_state(checkpoint_dir, run_id) if checkpoint_dir else None
        if state is None:
            state = TrainingState(fingerprint=run_id, epoch=0, model={}, optimizer={})
        else:
            model.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
        self.state = state
        self.resumed_from = state.epoch
        self.stopped = False

    def steps(self) -> Iterator[bool]:
        tp, model, state = self.train_params, self.model, self.state
        epochs = range(state.epoch + 1, tp.epochs + 1)
        bar = tqdm(epochs, desc="train", unit="epoch", disable=not self.progress, initial=state.epoch, total=tp.epochs)
        for epoch in bar:
            model.on_epoch_start(EpochSchedule(epoch=epoch, epochs=tp.epochs, cutoff_epoch=tp.cutoff_epoch))
            # Seeding per epoch makes a resumed run draw the same batches (and dropout) as an uninterrupted one.
            torch.manual_seed(tp.seed * 100_003 + epoch)
            shuffle = torch.Generator().manual_seed(tp.seed * 100_003 + epoch)
            model.train()
            if self.fast.enabled:
                sums, seen, correct = yield from self._fast_epoch(epoch, shuffle)
            else:
                sums, seen, correct = yield from self._plain_epoch(epoch, shuffle)
            row = self._end_epoch(epoch, sums, seen, correct)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_f1=f"{row['val_macro_f1']:.3f}")
            yield True
            if self.on_epoch and self.on_epoch(row) is True:
                self.stopped = True
                break
        bar.close()

    def _plain_epoch(self, epoch: int, shuffle: torch.Generator) -> Iterator[bool]:
        model, optimizer = self.model, self.optimizer
        seen, correct = 0, 0
        sums: dict[str, float] = {}
        for idx in _batches(len(self.train_source), self.train_params.batch_size, shuffle):
            x, y = self.train_source.batch(idx)
            optimizer.zero_grad(set_to_none=True)
            logits, attention = model(x)
            terms = dict(model.loss_terms(attention, self.settings))
            if self.extra_loss is not None:
                terms.update(self.extra_loss(model, TrainStep(epoch, idx, x, y, logits, attention)))
            losses = total_loss(logits, y, terms)
            losses["total"].backward()
            optimizer.step()
            k = len(idx)
            seen += k
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * k
            correct += int((logits.argmax(1) == y).sum())
            yield False
        return sums, seen, correct

    def _fast_epoch(self, epoch: int, shuffle: torch.Generator) -> Iterator[bool]:
        """The same step under autocast, with the running sums kept on the device (no per-step sync)."""
        model, optimizer, device = self.model, self.optimizer, self.device
        seen = 0
        correct = torch.zeros((), dtype=torch.int64, device=device)
        sums: dict[str, torch.Tensor] = {}
        for idx in _batches(len(self.train_source), self.train_params.batch_size, shuffle):
            x, y = self.train_source.batch(idx)
            optimizer.zero_grad(set_to_none=True)
            with self.fast.autocast(device):
                logits, attention = model(x)
                terms = dict(model.loss_terms(attention, self.settings))
                if self.extra_loss is not None:
                    terms.update(self.extra_loss(model, TrainStep(epoch, idx, x, y, logits, attention)))
                losses = total_loss(logits, y, terms)
            losses["total"].backward()
            optimizer.step()
            k = len(idx)
            seen += k
            for name, value in losses.items():
                weighted = value.detach().double() * k
                sums[name] = sums[name] + weighted if name in sums else weighted
            correct += (logits.argmax(1) == y).sum()
            yield False
        return {name: float(value) for name, value in sums.items()}, seen, int(correct)

    def _end_epoch(self, epoch: int, sums: dict[str, float], seen: int, correct: int) -> dict[str, float]:
        """Validate, append the history row, keep the best weights, write the checkpoint."""
        model, state, tp = self.model, self.state, self.train_params
        if self.fast.enabled:
            assert isinstance(self.val_source, DeviceSplit)
            val_metrics = _evaluate_fast(model, self.val_source, tp.batch_size, self.device, self.settings, self.fast)
        else:
            val_metrics = evaluate_split(model, self.val_source.split, tp.batch_size, self.device, self.settings)
        row = {"epoch": float(epoch)}
        row.update({f"train_{'loss' if name == 'total' else name}": value / seen for name, value in sums.items()})
        row.update({
            "train_acc": correct / seen,
            "val_loss": val_metrics["loss"],
            "val_acc": val_metrics["acc"],
            "val_macro_f1": val_metrics["macro_f1"],
            **model.epoch_metrics(),
        })
        state.history.append(row)
        state.epoch = epoch
        state.model = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if row["val_macro_f1"] >= state.best_score:
            state.best_score, state.best_epoch = row["val_macro_f1"], epoch
            state.best_model = copy.deepcopy(state.model)  # on CPU, state.model aliases the live weights
        state.optimizer = self.optimizer.state_dict()
        if self.checkpoint_dir:
            save_state(state, self.checkpoint_dir)
        return row

    def result(self) -> TrainResult:
        """Restore the kept epoch's weights and finish the model (call once, after ``steps()``)."""
        model, state = self.model, self.state
        if state.best_model is not None:
            model.load_state_dict(state.best_model)
        model.before_saving()
        if self.fast.channels_last:  # a saved or served model is used in the default layout
            model.to(memory_format=torch.contiguous_format)
        return TrainResult(model.eval(), self.spec, state.history, state.best_epoch, self.resumed_from, self.stopped)


def fit(
    model_params: ModelParams,
    train_params: TrainParams,
    train: LabelledImages,
    val: LabelledImages,
    *,
    class_names: list[str],
    on_epoch: Optional[EpochCallback] = None,
    init_from: Optional[InitFrom] = None,
    extra_loss: Optional[ExtraLoss] = None,
    checkpoint_dir: Optional[Path] = None,
    data_fingerprint: str = "",
    progress: bool = True,
) -> TrainResult:
    """Train one model through the contract's hooks; resumes from ``checkpoint_dir`` when it holds this run's state."""
    make_deterministic()
    run = TrainingRun(model_params, train_params, train, val, class_names=class_names, on_epoch=on_epoch,
                      init_from=init_from, extra_loss=extra_loss, checkpoint_dir=checkpoint_dir,
                      data_fingerprint=data_fingerprint, progress=progress)
    for _ in run.steps():
        pass
    return run.result()


def _fingerprinted(tp: TrainParams) -> dict:
    """The train params that change the result. The device and the fast path do not enter: a run
    resumes alike on CPU and CUDA (where ``fast_path: auto`` means something else)."""
    return {k: v for k, v in tp.__dict__.items() if k not in ("device", "fast_path")}


__all__ = [
    "EpochCallback", "ExtraLoss", "LabelledImages", "TrainResult", "TrainStep", "TrainingRun", "build_spec",
    "evaluate_split", "fit", "make_deterministic", "seed_everything",
]
