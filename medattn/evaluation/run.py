"""The evaluate stage: a model bundle on the test split -> metrics, faithfulness, figures.

Faithfulness compares the model's attention with the ground-truth lesion masks (embedded
synthetic set; any dataset with masks) against a uniform map: does the model look at lesions?
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from medattn.config import Params
from medattn.data.dataset import class_counts, load_split
from medattn.data.preprocess import normalize_tensor
from medattn.evaluation.faithfulness import attention_faithfulness
from medattn.evaluation.figures import attention_overlay_figure, confusion_matrix_figure
from medattn.evaluation.metrics import classification_metrics
from medattn.evaluation.reports import write_confusion_csv, write_metrics_json, write_per_class_csv
from medattn.models.bundle import load_bundle
from medattn.devices import resolve_device


@torch.no_grad()
def predict_split(model: torch.nn.Module, images_uint8: torch.Tensor, mean, std, device: torch.device,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and attention maps (N, H, W) for uint8 images (N, 3, H, W)."""
    probs, maps = [], []
    for start in range(0, len(images_uint8), batch_size):
        x = normalize_tensor(images_uint8[start:start + batch_size], mean, std).to(device)
        logits, attention = model(x)
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        maps.append(attention[:, 0].cpu().numpy())
    return np.concatenate(probs), np.concatenate(maps)


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
                   run_ref: Optional[Any] = None) -> dict[str, Any]:
    """Score the bundle on the test split; write reports under ``out_dir``; log to MLflow when a run is given."""
    device = resolve_device(params.train.device)
    model, spec = load_bundle(bundle_dir, device)
    test = load_split(dataset_dir, "test", with_masks=True)
    probs, attention = predict_split(model, test.images, spec.mean, spec.std, device)
    y_true, y_pred = test.labels.numpy(), probs.argmax(axis=1)
    majority = int(np.argmax(class_counts(dataset_dir, "train")))
    metrics = classification_metrics(y_true, y_pred, probs, test.class_names, majority)

    masks = test.masks[:, 0].numpy().astype(bool)
    has_mask = test.has_mask.numpy()
    metrics["attention"] = attention_faithfulness(attention[has_mask], masks[has_mask], params.evaluate.topk_percent)

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
        paths.append(attention_overlay_figure(images, attention[chosen], masks[chosen] if with_masks else None,
                                              titles, figures / "attention_overlays.png"))

    if run_ref is not None:
        from medattn.registry import log_artifacts, log_metrics, resumed_run

        flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        flat.update({f"test_attention_{k}": v for k, v in metrics["attention"].items() if isinstance(v, (int, float))})
        flat["baseline_majority_macro_f1"] = metrics["baseline"]["macro_f1"]
        with resumed_run(run_ref) as run_id:
            log_metrics(run_id, flat, run_ref.tracking_uri)
            log_artifacts(run_id, [out_dir / "metrics.json", out_dir / "confusion.csv", out_dir / "per_class.csv", *paths],
                          run_ref.tracking_uri, artifact_dir="evaluate")
    return metrics
