"""The evaluate stage: a model bundle on the test split -> metrics, faithfulness, figures.

Faithfulness compares the model's attention with the ground-truth lesion masks (embedded
synthetic set; any dataset with masks) against a uniform map and against the training
split's lesion-frequency map (the best image-independent map): does the model look at
lesions, and at *this image's* lesions? Without a masked test image (every real source) it is
reported as absent (``attention.available: false``), not computed.

Beside the model stand two baselines from the training split: the majority class and seed
001's logistic regression on raw pixels (``baseline.pixel_logreg_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medattn.config import Params
from medattn.data.dataset import SplitTensors, class_counts, load_split
from medattn.data.preprocess import normalize_tensor
from medattn.devices import resolve_device
from medattn.evaluation.baselines import pixel_logistic_regression
from medattn.evaluation.faithfulness import attention_faithfulness, lesion_frequency_map
from medattn.evaluation.figures import attention_overlay_figure, confusion_matrix_figure
from medattn.evaluation.metrics import classification_metrics
from medattn.evaluation.reports import (
    write_confusion_csv,
    write_metrics_json,
    write_per_class_csv,
)
from medattn.models.base import AttentionModel
from medattn.models.bundle import load_bundle


@torch.no_grad()
def predict_split(model: AttentionModel, images_uint8: torch.Tensor, mean, std, device: torch.device,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and attention for uint8 images (N, 3, H, W).

    The attention is (N, H, W), or one (H, W) map for a method whose map is the same for every
    image (``global_attention()``, seed 001): computed once per pass, since N copies would only
    cost memory, and faithfulness and figures broadcast a single map themselves.
    """
    model.eval()
    global_map = model.global_attention()
    probs, maps = [], []
    for start in range(0, len(images_uint8), batch_size):
        x = normalize_tensor(images_uint8[start:start + batch_size], mean, std).to(device)
        logits, attention = model(x)
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        if global_map is None:
            maps.append(attention[:, 0].cpu())
    probabilities = np.concatenate(probs) if probs else np.zeros((0, 0), dtype=np.float32)
    if global_map is not None:
        return probabilities, global_map.cpu().numpy()
    size = images_uint8.shape[-2:]
    return probabilities, (torch.cat(maps).numpy() if maps else np.zeros((0, *size), dtype=np.float32))


def overlay_indices(labels: np.ndarray, count: int) -> list[int]:
    """A fixed, class-balanced choice of test images: round-robin over classes in manifest order."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(labels)):
        for members in by_class:
            if members and len(chosen) < count:
                chosen.append(int(members.pop(0)))
    return chosen


def run_evaluation(params: Params, bundle_dir: Path, dataset_dir: Path, out_dir: Path,
                   run_ref: Any | None = None) -> dict[str, Any]:
    """Score the bundle on the test split; write reports under ``out_dir``; log to MLflow when a run is given."""
    device = resolve_device(params.train.device)
    model, spec = load_bundle(bundle_dir, device)
    test = load_split(dataset_dir, "test", with_masks=True)
    train = load_split(dataset_dir, "train", with_masks=True)
    probs, attention = predict_split(model, test.images, spec.mean, spec.std, device)
    is_global = attention.ndim == 2
    y_true, y_pred = test.labels.numpy(), probs.argmax(axis=1)
    majority = int(np.argmax(class_counts(dataset_dir, "train")))
    metrics = classification_metrics(y_true, y_pred, probs, test.class_names, majority)
    logreg = pixel_logistic_regression(train.images, train.labels, test.images, test.labels, seed=params.train.seed)
    metrics["baseline"].update({f"pixel_logreg_{key}": value for key, value in logreg.items()})

    masks = test.masks[:, 0].numpy().astype(bool)
    has_mask = test.has_mask.numpy()
    metrics["attention"] = attention_faithfulness(attention if is_global else attention[has_mask], masks[has_mask],
                                                  params.evaluate.topk_percent, prior=training_lesion_prior(train))

    names = test.class_names
    write_metrics_json(metrics, out_dir / "metrics.json")
    write_confusion_csv([names[i] for i in y_true], [names[i] for i in y_pred], out_dir / "confusion.csv")
    write_per_class_csv(metrics["per_class"], out_dir / "per_class.csv")
    figures = out_dir / "figures"
    paths = [confusion_matrix_figure(metrics["confusion_matrix"], names, figures / "confusion_matrix.png")]
    chosen = overlay_indices(y_true, params.evaluate.overlay_count)
    if chosen:
        titles = [f"{test.ids[i]}: true {names[y_true[i]]} / pred {names[y_pred[i]]} ({probs[i].max():.2f})"
                  for i in chosen]
        images = test.images[chosen].permute(0, 2, 3, 1).numpy()
        with_masks = bool(has_mask[chosen].any())
        paths.append(attention_overlay_figure(images, attention if is_global else attention[chosen],
                                              masks[chosen] if with_masks else None, titles,
                                              figures / "attention_overlays.png"))

    if run_ref is not None:
        from medattn.registry import log_artifacts, log_metrics, resumed_run

        with resumed_run(run_ref) as run_id:
            log_metrics(run_id, mlflow_metrics(metrics), run_ref.tracking_uri)
            log_artifacts(run_id, [out_dir / "metrics.json", out_dir / "confusion.csv", out_dir / "per_class.csv", *paths],
                          run_ref.tracking_uri, artifact_dir="evaluate")
    return metrics


def training_lesion_prior(train: SplitTensors) -> np.ndarray | None:
    """The training split's lesion-frequency map (H, W), or None when no training image has a mask."""
    has_mask = train.has_mask.numpy()
    if not has_mask.any():
        return None
    return lesion_frequency_map(train.masks[has_mask, 0].numpy())


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat MLflow names of the evaluate metrics (``test_*``, ``test_attention_*``, ``baseline_*``).

    Scores that are absent (None: no masked test image) are left out rather than logged as 0.
    """
    def numbers(items: dict[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in items.items() if isinstance(v, (int, float))}

    baseline = metrics["baseline"]
    flat = {f"test_{k}": v for k, v in numbers(metrics).items()}
    flat.update({f"test_attention_{k}": v for k, v in numbers(metrics["attention"]).items()})
    flat["baseline_majority_macro_f1"] = float(baseline["macro_f1"])
    flat.update({f"baseline_{k}": v for k, v in numbers(baseline).items() if k.startswith("pixel_logreg_")})
    return flat
