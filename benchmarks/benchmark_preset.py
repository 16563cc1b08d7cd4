"""How hard is an embedded synthetic preset? Shallow baselines on its train -> test split.

Prints, for a prepared synthetic dataset (generated here from ``--preset`` unless ``--prepared``
points at one):

* **LR on pixels**: scikit-learn LogisticRegression on standardised, flattened pixels at
  ``--lr-size`` px, trained on train, scored on test (macro-F1). A preset that this already
  aces cannot show what attention adds.
* **best colour rule**: the single per-image colour statistic and threshold (fitted on train)
  that best separates the top grade from the rest, scored on test (balanced accuracy).
* **model**: the demo model's test macro-F1 if ``--model-metrics`` names the evaluate stage's
  ``metrics.json`` (this script does not train: run the pipeline for that figure), and the
  ratio of the LR figure to it.

    python benchmarks/benchmark_preset.py --preset benchmark --n-images 1080
    python benchmarks/benchmark_preset.py --prepared data/prepared --model-metrics reports/evaluate/metrics.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medattn.config import SyntheticParams
from medattn.data.manifest import read_manifest
from medattn.data.preprocess import area_resize
from medattn.data.synthetic_fundus import generate_synthetic_fundus

_STATISTICS = ("mean", "std", "p1", "p99")


def load_split(folder: Path, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images (N, size, size, 3) float32 0..1, labels)} of a prepared dataset."""
    frame = read_manifest(folder)
    out = {}
    for split, rows in frame.groupby("split"):
        images = np.stack([np.asarray(area_resize(Image.open(folder / p).convert("RGB"), size), np.float32) / 255.0
                           for p in rows["path"]])
        out[str(split)] = (images, rows["label"].to_numpy())
    return out


def pixel_lr_macro_f1(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(train[0].reshape(len(train[0]), -1), train[1])
    predicted = model.predict(test[0].reshape(len(test[0]), -1))
    return float(f1_score(test[1], predicted, average="macro"))


def colour_statistics(images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per image: each channel's mean, std, 1st and 99th percentile and high percentiles of G - B
    over the field of view."""
    field = images.max(axis=3) > 20 / 255
    columns, names = [], []
    for channel, channel_name in enumerate("RGB"):
        values = [image[..., channel][inside] for image, inside in zip(images, field)]
        for stat in _STATISTICS:
            if stat == "mean":
                columns.append([v.mean() for v in values])
            elif stat == "std":
                columns.append([v.std() for v in values])
            else:
                columns.append([np.percentile(v, float(stat[1:])) for v in values])
            names.append(f"{channel_name} {stat}")
    # exudate yellow raises green but not blue: the easy preset's tell-tale for its top grade
    yellowness = [(image[..., 1] - image[..., 2])[inside] for image, inside in zip(images, field)]
    for q in (99.0, 99.9):
        columns.append([np.percentile(v, q) for v in yellowness])
        names.append(f"G-B p{q:g}")
    return np.asarray(columns).T, names


def best_colour_rule(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> tuple[str, float]:
    """The (statistic, test balanced accuracy) of the best one-threshold top-grade-vs-rest rule on train."""
    top = int(max(train[1].max(), test[1].max()))
    train_x, names = colour_statistics(train[0])
    test_x, _ = colour_statistics(test[0])
    best = (-1.0, 0, 0.0, 1)  # (train score, feature, threshold, direction)
    for feature in range(train_x.shape[1]):
        for threshold in np.unique(train_x[:, feature]):
            for direction in (1, -1):
                score = _balanced_accuracy(direction * (train_x[:, feature] - threshold) >= 0, train[1] == top)
                if score > best[0]:
                    best = (score, feature, float(threshold), direction)
    _, feature, threshold, direction = best
    rule = f"{names[feature]} {'>=' if direction > 0 else '<='} {threshold:.3f}"
    return rule, _balanced_accuracy(direction * (test_x[:, feature] - threshold) >= 0, test[1] == top)


def _balanced_accuracy(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float((predicted[actual].mean() + (~predicted[~actual]).mean()) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="benchmark", help="synthetic preset to generate (default: %(default)s)")
    parser.add_argument("--n-images", type=int, default=1080, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=2024, help="data.synthetic.seed (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=96, help="generated size (default: %(default)s)")
    parser.add_argument("--prepared", type=Path, default=None, help="use this prepared dataset instead of generating")
    parser.add_argument("--lr-size", type=int, default=32, help="pixel size the LR baseline sees (default: %(default)s)")
    parser.add_argument("--model-metrics", type=Path, default=None, help="evaluate stage metrics.json to compare with")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.prepared
        if folder is None:
            folder = Path(scratch) / "prepared"
            params = SyntheticParams(preset=args.preset, n_images=args.n_images, seed=args.seed)
            generate_synthetic_fundus(folder, params, args.image_size)
        splits = load_split(folder, args.lr_size)
    lr_f1 = pixel_lr_macro_f1(splits["train"], splits["test"])
    rule, rule_accuracy = best_colour_rule(splits["train"], splits["test"])
    print(f"dataset: {args.prepared or f'{args.preset} preset, {args.n_images} images, seed {args.seed}'}; "
          f"test images {len(splits['test'][1])}")
    print(f"LR on standardised {args.lr_size}px pixels: test macro-F1 {lr_f1:.3f}")
    print(f"best single colour rule for the top grade ({rule}): test balanced accuracy {rule_accuracy:.3f}")
    if args.model_metrics is not None:
        metrics = json.loads(args.model_metrics.read_text())
        model_f1 = float(metrics["test_macro_f1"] if "test_macro_f1" in metrics else metrics["macro_f1"])
        print(f"model ({args.model_metrics}): test macro-F1 {model_f1:.3f}; LR / model = {lr_f1 / model_f1:.2f}")


if __name__ == "__main__":
    main()
