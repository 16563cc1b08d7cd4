"""The train stage: prepared dataset -> fit (Algorithm 1 for the global map) -> model bundle, curves, one MLflow run.

The MLflow run created here is the pipeline run: its id goes to ``mlflow_run.json`` so the
evaluate and register stages (separate processes under DVC) add to the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from medattn.config import Params
from medattn.data.dataset import load_split
from medattn.data.manifest import read_manifest
from medattn.data.preprocess import normalize_tensor
from medattn.devices import resolve_device
from medattn.evaluation.figures import global_attention_map_figure, training_curves_figure
from medattn.evaluation.reports import write_history_csv, write_metrics_json
from medattn.models.bundle import save_bundle
from medattn.training.checkpoints import fingerprint
from medattn.training.fit import LabelledImages, TrainResult, fit


@dataclass(frozen=True)
class TrainOutputs:
    bundle_dir: Path
    report_dir: Path
    checkpoint_dir: Path
    # the validate stage's report, logged with the run so MLflow shows what data was trained on
    validation_report_dir: Optional[Path] = None


def _labelled(dataset_dir: Path, split: str) -> tuple[LabelledImages, list[str]]:
    tensors = load_split(dataset_dir, split, with_masks=False)
    return LabelledImages(normalize_tensor(tensors.images), tensors.labels), tensors.class_names


def data_fingerprint(dataset_dir: Path) -> str:
    """Hash of the manifest's image hashes and labels: a checkpoint is only reused on the same data."""
    frame = read_manifest(dataset_dir)
    return fingerprint(frame[["id", "sha256", "label", "split"]].astype(str).values.tolist())


def run_training(params: Params, dataset_dir: Path, outputs: TrainOutputs, progress: bool = True) -> TrainResult:
    from medattn.registry import (
        log_artifacts,
        log_epoch_metrics,
        log_metrics,
        pipeline_run,
        resolve_tracking_uri,
        write_run_ref,
    )

    train, class_names = _labelled(dataset_dir, "train")
    val, _ = _labelled(dataset_dir, "val")
    uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    device = resolve_device(params.train.device)
    tags = {"stage": "train", "data.source": params.data.source, "device": str(device)}
    with pipeline_run(params.flat(), params.mlflow.experiment, uri, tags=tags) as run_id:
        started = time.perf_counter()
        result = fit(
            params.model,
            params.train,
            train,
            val,
            class_names=class_names,
            checkpoint_dir=outputs.checkpoint_dir,
            data_fingerprint=data_fingerprint(dataset_dir),
            on_epoch=lambda row: log_epoch_metrics(run_id, [row], uri),
            progress=progress,
        )
        seconds = time.perf_counter() - started
        if result.resumed_from_epoch:
            # epochs before the interruption were logged by the killed process's own run
            log_epoch_metrics(run_id, result.history[: result.resumed_from_epoch], uri)
        save_bundle(result.model, result.spec, outputs.bundle_dir)
        # written only once there is a model: a failed train must not leave a reference that
        # later stages would follow to a FAILED run
        write_run_ref(outputs.report_dir / "mlflow_run.json", run_id, uri)

        best = result.best_row
        summary = {
            "best_epoch": result.best_epoch,
            "best_val_macro_f1": best["val_macro_f1"],
            "best_val_acc": best["val_acc"],
            "epochs": len(result.history),
            "train_seconds": round(seconds, 2),
            "resumed_from_epoch": result.resumed_from_epoch,
        }
        report = outputs.report_dir
        write_metrics_json(summary, report / "metrics.json")
        write_history_csv(result.history, report / "history.csv")
        figures = [training_curves_figure(result.history, params.train.cutoff_epoch, report / "figures" / "curves.png")]
        global_map = result.model.global_attention()
        if global_map is not None:
            figures.append(global_attention_map_figure(global_map.cpu().numpy(), report / "figures" / "global_attention_map.png"))
        log_metrics(run_id, {f"train_{k}": v for k, v in summary.items()}, uri)
        log_artifacts(run_id, [*figures, report / "history.csv", outputs.bundle_dir / "model_spec.json"], uri,
                      artifact_dir="train")
        if outputs.validation_report_dir is not None and outputs.validation_report_dir.is_dir():
            log_artifacts(run_id, [outputs.validation_report_dir], uri)
    return result
