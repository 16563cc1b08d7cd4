"""The evaluate stage's own pieces: predictions with one global map, the flat MLflow names."""

from __future__ import annotations

import numpy as np
import torch

from medattn.evaluation.run import mlflow_metrics, predict_split
from medattn.models.base import AttentionModel


class PerImageAttention(AttentionModel):
    """Logits from the mean intensity; attention = the image's own first channel squashed to [0, 1]."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([mean, -mean], dim=1), torch.sigmoid(x[:, :1])


class SharedMapAttention(PerImageAttention):
    """One map for every image, broadcast over the batch as the model contract allows."""

    attention_is_global = True

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.map = torch.linspace(0, 1, height * width).reshape(1, 1, height, width)

    def global_attention(self) -> torch.Tensor:
        return self.map[0, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = super().forward(x)
        return logits, self.map.expand(x.shape[0], 1, x.shape[2], x.shape[3])


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 6, 5), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)


def test_per_image_attention_is_kept_per_image_across_batches() -> None:
    images = _images(7)
    probs, attention = predict_split(PerImageAttention(), images, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"),
                                     batch_size=3)
    assert probs.shape == (7, 2) and attention.shape == (7, 6, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(attention[0], attention[1])  # each image its own map


def test_a_global_map_is_returned_once_not_once_per_image() -> None:
    images = _images(7)
    model = SharedMapAttention(6, 5)
    probs, attention = predict_split(model, images, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), batch_size=3)
    assert probs.shape == (7, 2)
    assert attention.shape == (6, 5)
    np.testing.assert_allclose(attention, model.map[0, 0].numpy())
    empty_probs, empty_attention = predict_split(PerImageAttention(), images[:0], (0.5,) * 3, (0.25,) * 3,
                                                 torch.device("cpu"))
    assert empty_probs.shape[0] == 0 and empty_attention.shape == (0, 6, 5)
    # the probabilities do not depend on how the global map is returned
    per_image_probs, _ = predict_split(PerImageAttention(), images, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    np.testing.assert_allclose(probs, per_image_probs, rtol=1e-6)


def test_mlflow_metrics_leave_absent_scores_out_and_name_the_baselines() -> None:
    metrics = {
        "macro_f1": 0.5, "accuracy": 0.6, "roc_auc_ovr": None, "per_class": {"a": {"f1": 1.0}},
        "baseline": {"majority_label": 0, "majority_class": "a", "macro_f1": 0.2, "accuracy": 0.5,
                     "pixel_logreg_macro_f1": 0.4, "pixel_logreg_accuracy": 0.45},
        "attention": {"available": False, "n_images_with_mask": 0, "topk_percent": 5.0, "mass_inside_model": None},
    }
    flat = mlflow_metrics(metrics)
    assert flat == {
        "test_macro_f1": 0.5, "test_accuracy": 0.6,
        "test_attention_available": 0.0, "test_attention_n_images_with_mask": 0.0, "test_attention_topk_percent": 5.0,
        "baseline_majority_macro_f1": 0.2,
        "baseline_pixel_logreg_macro_f1": 0.4, "baseline_pixel_logreg_accuracy": 0.45,
    }
