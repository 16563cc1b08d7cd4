"""The objective: one trial = one ``fit`` on the train split, scored on the validation split.

``trial.report(val_macro_f1, epoch)`` + ``trial.should_prune()`` run inside ``fit``'s
``on_epoch``, so a pruned trial stops where ``fit`` stops: there is no second training loop.
The test split is never loaded here. The first objective is the kept epoch's validation
macro-F1; the optional second, ``attention_mass_ratio``, is the share of attention mass on the
validation images' lesion masks over a uniform map's (1 = chance; ``medattn.evaluation.faithfulness``).
Optuna cannot prune a multi-objective study, so with two objectives every trial runs to the end.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import torch

from medattn.config import Params
from medattn.errors import DataError, first_line
from medattn.training.fit import LabelledImages, fit
from medattn.tuning.space import SearchSpace, apply_values
from medattn.tuning.tracking import TRIAL_RUN_ATTR, StudyTracking


@dataclass(frozen=True)
class TrialData:
    """What every trial trains and scores on: train + validation splits, the validation masks."""

    class_names: list[str]
    train: LabelledImages
    val: LabelledImages
    val_masks: Optional[np.ndarray]  # bool (M, H, W) of the validation images that have a mask
    val_mask_index: Optional[np.ndarray]  # their positions in the validation split
    fingerprint: str


def load_trial_data(dataset_dir: Path, need_masks: bool) -> TrialData:
    from medattn.data.dataset import load_split
    from medattn.data.preprocess import normalize_tensor
    from medattn.training.run import data_fingerprint

    train = load_split(dataset_dir, "train", with_masks=False)
    val = load_split(dataset_dir, "val", with_masks=need_masks)
    masks = index = None
    if need_masks:
        has_mask = val.has_mask.numpy()
        if not has_mask.any():
            raise DataError(f"{dataset_dir}: tune.objectives has attention_mass_ratio but no validation image has "
                            "a lesion mask (only the synthetic set ships masks): drop it from tune.objectives")
        index = np.flatnonzero(has_mask)
        masks = val.masks[index, 0].numpy().astype(bool)
    return TrialData(
        class_names=train.class_names,
        train=LabelledImages(normalize_tensor(train.images), train.labels),
        val=LabelledImages(normalize_tensor(val.images), val.labels),
        val_masks=masks,
        val_mask_index=index,
        fingerprint=data_fingerprint(dataset_dir),
    )


@torch.no_grad()
def attention_mass_ratio(model, data: TrialData, batch_size: int, topk_percent: float) -> float:
    """Attention mass on the validation lesions over a uniform map's: the second objective."""
    from medattn.evaluation.faithfulness import attention_faithfulness

    assert data.val_masks is not None and data.val_mask_index is not None
    model.eval()
    global_map = model.global_attention()
    if global_map is not None:
        attention = global_map.cpu().numpy()
    else:
        device = next(model.parameters()).device
        images = data.val.images[torch.as_tensor(data.val_mask_index)]
        maps = [model(images[s:s + batch_size].to(device))[1][:, 0].cpu() for s in range(0, len(images), batch_size)]
        attention = torch.cat(maps).numpy()
    scores = attention_faithfulness(attention, data.val_masks, topk_percent)
    return float(scores["mass_inside_ratio"])


class Objective:
    """``study.optimize(Objective(...))``: a plain callable of the trial, as in Optuna's examples."""

    def __init__(self, params: Params, space: SearchSpace, data: TrialData, tracking: Optional[StudyTracking],
                 progress: bool = False) -> None:
        self.params = params
        self.space = space
        self.data = data
        self.tracking = tracking
        self.progress = progress
        self.objectives = tuple(params.tune.objectives)
        self.last_trial_number: Optional[int] = None
        self.last_failure: Optional[str] = None

    def __call__(self, trial: optuna.Trial) -> Any:
        self.last_trial_number = trial.number
        # who ran it: a shared study's trials come from many processes and hosts
        worker = os.environ.get("MEDATTN_TUNE_WORKER", "0")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:{worker}")
        values = self.space.suggest(trial)
        model_params, train_params = apply_values(self.params.model, self.params.train, values)
        multi = len(self.objectives) > 1
        run_id = self._start_run(trial, values)
        state = "failed"

        def on_epoch(row: dict[str, float]) -> None:
            if run_id:
                self.tracking.log_epoch(run_id, row)
            if multi:
                return  # Optuna does not prune multi-objective studies (trial.report would raise)
            step = int(row["epoch"])
            trial.report(row["val_macro_f1"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {step}: val macro-F1 {row['val_macro_f1']:.3f} below the median")

        try:
            result = fit(model_params, train_params, self.data.train, self.data.val,
                         class_names=self.data.class_names, on_epoch=on_epoch,
                         data_fingerprint=self.data.fingerprint, progress=self.progress)
            scores = {"val_macro_f1": float(result.best_row["val_macro_f1"])}
            if "attention_mass_ratio" in self.objectives:
                scores["attention_mass_ratio"] = attention_mass_ratio(
                    result.model, self.data, train_params.batch_size, self.params.evaluate.topk_percent)
            trial.set_user_attr("best_epoch", result.best_epoch)
            if run_id:
                self.tracking.log_metrics(run_id, {**scores, "best_epoch": result.best_epoch})
            state = "complete"
            return tuple(scores[name] for name in self.objectives) if multi else scores["val_macro_f1"]
        except optuna.TrialPruned:
            state = "pruned"
            raise
        except Exception as exc:
            self.last_failure = first_line(exc)
            raise
        finally:
            if run_id:
                self.tracking.end_trial_run(run_id, state)

    def _start_run(self, trial: optuna.Trial, values: dict[str, Any]) -> Optional[str]:
        if self.tracking is None:
            return None
        # set by RetryHeartbeatStaleTrialCallback: the trial numbers this one retries, the latest last
        this = trial.study.get_trials(deepcopy=False)[trial.number]  # trials are ordered by number
        history = this.system_attrs.get("retry_history") or []
        tags = {"optuna.study": trial.study.study_name}
        if history:
            tags["optuna.retry_of"] = str(history[-1])
            self._close_dead_run(trial.study, int(history[-1]))
        fixed = {f"fixed.{k}": v for k, v in dataclasses.asdict(self.params.train).items()
                 if f"train.{k}" not in values}
        run_id = self.tracking.start_trial_run(trial.number, {**values, **fixed}, tags)
        trial.set_user_attr(TRIAL_RUN_ATTR, run_id)
        return run_id

    def _close_dead_run(self, study: optuna.Study, number: int) -> None:
        """The killed worker's run still reads RUNNING: mark it failed now that its retry starts."""
        dead = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        run_id = dead.user_attrs.get(TRIAL_RUN_ATTR) if dead is not None else None
        if run_id:
            self.tracking.end_trial_run(run_id, "failed")
