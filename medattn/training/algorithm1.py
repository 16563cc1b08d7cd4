"""Algorithm 1 of seed 001: joint training until the cut-off epoch E, then the pixel CNN is fixed.

    for epoch = 1..E:        optimise the image CNN and the pixel CNN together
    for epoch = E+1..epochs: fix the pixel CNN (M computed once), optimise the image CNN only

Adam with learning rate / weight decay from params, mini-batches of ``batch_size``. The same
loop trains the other attention models of the factory (for them there is nothing to freeze).
Each epoch ends with a validation pass and a resumable checkpoint; the model kept is the
epoch with the best validation macro-F1 (ties: the later epoch, which has seen more data).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from tqdm.auto import tqdm

from medattn.config import ModelParams, TrainParams
from medattn.models.factory import ModelSpec, create_model
from medattn.models.global_attention import GlobalPixelAttention, pixel_representation_from_images
from medattn.training.checkpoints import TrainingState, fingerprint, load_state, save_state
from medattn.training.losses import attention_classification_loss

EpochCallback = Callable[[dict[str, float]], None]


@dataclass
class LabelledImages:
    """A split held in memory: normalised images (N, C, H, W) float32 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class TrainResult:
    model: nn.Module
    spec: ModelSpec
    history: list[dict[str, float]]
    best_epoch: int
    resumed_from_epoch: int

    @property
    def best_row(self) -> dict[str, float]:
        """The history row of the kept (best validation macro-F1) epoch."""
        return self.history[self.best_epoch - 1] if self.best_epoch else self.history[-1]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present and falls back to CPU cleanly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _batches(n: int, batch_size: int, generator: Optional[torch.Generator]) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def evaluate_split(model: nn.Module, split: LabelledImages, batch_size: int, device: torch.device,
                   lambda_l1: float = 0.0) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of ``model`` on a split (eval mode)."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    preds: list[np.ndarray] = []
    for idx in _batches(len(split.labels), batch_size, None):
        x, y = split.images[idx].to(device), split.labels[idx].to(device)
        logits, attention = model(x)
        terms = attention_classification_loss(logits, y, attention, lambda_l1, getattr(model, "l1_on_attention", False))
        loss_sum += float(terms.total) * len(idx)
        p = logits.argmax(dim=1)
        correct += int((p == y).sum())
        total += len(idx)
        preds.append(p.cpu().numpy())
    y_pred = np.concatenate(preds) if preds else np.array([], dtype=int)
    macro_f1 = float(f1_score(split.labels.numpy(), y_pred, average="macro", zero_division=0)) if total else 0.0
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1), "macro_f1": macro_f1}


def build_spec(model_params: ModelParams, class_names: list[str], train: LabelledImages) -> ModelSpec:
    n, c, h, w = train.images.shape
    return ModelSpec(
        backbone=model_params.backbone,
        attention=model_params.attention,
        num_classes=len(class_names),
        image_size=h,
        class_names=tuple(class_names),
        in_channels=c,
        K=model_params.K,
        n_pixel_channels=n * c if model_params.attention == "global_pixel" else 0,
    )


def train_algorithm1(
    model_params: ModelParams,
    train_params: TrainParams,
    class_names: list[str],
    train: LabelledImages,
    val: LabelledImages,
    checkpoint_dir: Optional[Path] = None,
    data_fingerprint: str = "",
    on_epoch: Optional[EpochCallback] = None,
    progress: bool = True,
) -> TrainResult:
    """Train per Algorithm 1; resumes from ``checkpoint_dir`` when it holds this run's state.

    ``on_epoch`` receives each epoch's metrics (MLflow logging, Optuna pruning: it may raise
    ``optuna.TrialPruned`` to stop early).
    """
    tp = train_params
    device = resolve_device(tp.device)
    seed_everything(tp.seed)
    spec = build_spec(model_params, class_names, train)
    model = create_model(spec, model_params.pretrained_weights).to(device)
    pixels = pixel_representation_from_images(train.images) if isinstance(model, GlobalPixelAttention) else None
    if pixels is not None:
        model.set_pixel_representation(pixels)
    optimizer = torch.optim.Adam(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)

    run_id = fingerprint(model_params.__dict__, tp.__dict__, class_names, data_fingerprint)
    state = load_state(checkpoint_dir, run_id) if checkpoint_dir else None
    if state is None:
        state = TrainingState(fingerprint=run_id, epoch=0, model={}, optimizer={})
    else:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
    resumed_from = state.epoch

    epochs = range(state.epoch + 1, tp.epochs + 1)
    bar = tqdm(epochs, desc="train", unit="epoch", disable=not progress, initial=state.epoch, total=tp.epochs)
    for epoch in bar:
        if isinstance(model, GlobalPixelAttention) and epoch > tp.cutoff_epoch:
            model.freeze()  # Algorithm 1, line 4: M computed once, pixel CNN fixed from now on
        # Seeding per epoch makes a resumed run draw the same batches as an uninterrupted one.
        torch.manual_seed(tp.seed * 100_003 + epoch)
        shuffle = torch.Generator().manual_seed(tp.seed * 100_003 + epoch)
        model.train()
        seen, loss_sum, ce_sum, l1_sum, correct = 0, 0.0, 0.0, 0.0, 0
        for idx in _batches(len(train.labels), tp.batch_size, shuffle):
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            logits, attention = model(x)
            terms = attention_classification_loss(logits, y, attention, tp.lambda_l1, getattr(model, "l1_on_attention", False))
            terms.total.backward()
            optimizer.step()
            k = len(idx)
            seen += k
            loss_sum += terms.total.item() * k
            ce_sum += terms.cross_entropy.item() * k
            l1_sum += terms.attention_l1.item() * k
            correct += int((logits.argmax(1) == y).sum())
        val_metrics = evaluate_split(model, val, tp.batch_size, device, tp.lambda_l1)
        row = {
            "epoch": float(epoch),
            "train_loss": loss_sum / seen,
            "train_ce": ce_sum / seen,
            "train_attention_l1": l1_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val_metrics["loss"],
            "val_acc": val_metrics["acc"],
            "val_macro_f1": val_metrics["macro_f1"],
            "pixel_cnn_frozen": float(bool(getattr(model, "is_frozen", False))),
        }
        state.history.append(row)
        state.epoch = epoch
        state.model = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if row["val_macro_f1"] >= state.best_score:
            state.best_score, state.best_epoch = row["val_macro_f1"], epoch
            state.best_model = copy.deepcopy(state.model)  # on CPU, state.model aliases the live weights
        state.optimizer = optimizer.state_dict()
        if checkpoint_dir:
            save_state(state, checkpoint_dir)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_f1=f"{row['val_macro_f1']:.3f}")
        if on_epoch:
            on_epoch(row)

    if state.best_model is not None:
        model.load_state_dict(state.best_model)
    if isinstance(model, GlobalPixelAttention):
        if not bool(model.is_frozen):
            model.set_pixel_representation(pixels)  # the best epoch may precede the cut-off
        model.freeze()  # the saved model carries M, not P
    return TrainResult(model.eval(), spec, state.history, state.best_epoch, resumed_from)
