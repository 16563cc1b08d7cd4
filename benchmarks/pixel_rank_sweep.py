"""Does compressing P cost accuracy or attention quality? The demo model at several ``model.pixel_rank``.

The demo model (small_cnn + seed 001's global map, Algorithm 1) is trained by the train stage's
library code (``medattn.training.fit``) on the benchmark preset of ``params.yaml`` (prepared once by
the prepare stage's code), once per pixel rank R and train seed, and scored on the test split with
the evaluate stage's functions: ``classification_metrics`` (macro-F1, accuracy) and
``attention_faithfulness`` (mass inside the lesion masks and top-k IoU, against uniform and against
the training split's lesion-frequency prior). R = 0 is P as is (NC = training images x 3).

Prints mean ± std over seeds per R, and for each R > 0 whether it is *within noise* of R = 0:
|mean_R - mean_0| <= 2 standard errors of that difference (sqrt(s_R²/n_R + s_0²/n_0)).
Writes every run and the summary to ``--out`` (JSON, rewritten after each run: an interrupted
sweep keeps what it finished, and ``--resume`` skips those runs).

    python benchmarks/pixel_rank_sweep.py                                   # R 16,32,64,128 and 0, seeds 0 1 2
    python benchmarks/pixel_rank_sweep.py --epochs 12 --cutoff-epoch 5 --workers 2 --resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
#: what the table reports, from the evaluate stage's metrics (key in the run record, label)
FIGURES = (
    ("macro_f1", "test macro-F1"),
    ("accuracy", "test accuracy"),
    ("mass_inside_ratio", "mass in lesions / uniform"),
    ("mass_inside_model_over_prior", "mass / prior"),
    ("topk_iou_ratio", "top-k IoU / chance"),
    ("topk_iou_model_over_prior", "top-k IoU / prior"),
)


@dataclass(frozen=True)
class SweepConfig:
    """What every run shares; the params file supplies the rest (lr, λ, K, batch size, ...)."""

    params_path: str
    n_images: int
    image_size: int
    epochs: int
    cutoff_epoch: int


def sweep_params(cfg: SweepConfig, rank: int, seed: int):
    """The demo's params at the sweep's size, for one pixel rank and train seed (CPU, plain path)."""
    from medattn.config import load_params

    base = load_params(cfg.params_path)
    data = replace(base.data, source="synthetic", image_size=cfg.image_size,
                   synthetic=replace(base.data.synthetic, n_images=cfg.n_images))
    return replace(
        base,
        data=data,
        model=replace(base.model, backbone="small_cnn", attention="global_pixel", pixel_rank=rank,
                      pretrained_weights=None),
        train=replace(base.train, epochs=cfg.epochs, cutoff_epoch=min(cfg.cutoff_epoch, cfg.epochs), seed=seed,
                      device="cpu", fast_path="off"),
    )


def prepare(cfg: SweepConfig, out_dir: Path) -> Path:
    """The prepare stage's dataset for the sweep's data params (the same for every run)."""
    from medattn.data.prepare import prepare_dataset

    return prepare_dataset(sweep_params(cfg, 0, 0), out_dir, progress=False)


def train_and_score(cfg: SweepConfig, dataset_dir: str, rank: int, seed: int) -> dict[str, Any]:
    """One run: fit on train (val picks the kept epoch), then the evaluate stage's figures on test."""
    import numpy as np

    from medattn.data.dataset import class_counts, load_split
    from medattn.data.preprocess import normalize_tensor
    from medattn.evaluation.faithfulness import attention_faithfulness
    from medattn.evaluation.metrics import classification_metrics
    from medattn.evaluation.run import predict_split, training_lesion_prior
    from medattn.training.fit import LabelledImages, fit

    params = sweep_params(cfg, rank, seed)
    folder = Path(dataset_dir)
    train = load_split(folder, "train", with_masks=True)
    val = load_split(folder, "val", with_masks=False)
    test = load_split(folder, "test", with_masks=True)
    started = time.perf_counter()
    result = fit(params.model, params.train, LabelledImages(normalize_tensor(train.images), train.labels),
                 LabelledImages(normalize_tensor(val.images), val.labels), class_names=train.class_names,
                 progress=False)
    seconds = time.perf_counter() - started
    device = result.model.frozen_map.device
    probs, attention = predict_split(result.model, test.images, result.spec.mean, result.spec.std, device)
    y_true, y_pred = test.labels.numpy(), probs.argmax(axis=1)
    majority = int(np.argmax(class_counts(folder, "train")))
    metrics = classification_metrics(y_true, y_pred, probs, test.class_names, majority)
    has_mask = test.has_mask.numpy()
    faith = attention_faithfulness(attention, test.masks[:, 0].numpy().astype(bool)[has_mask],
                                   params.evaluate.topk_percent, prior=training_lesion_prior(train))
    return {
        "pixel_rank": rank,
        "seed": seed,
        "n_pixel_channels": result.spec.n_pixel_channels,
        "pixel_cnn_parameters": sum(p.numel() for p in result.model.pixel_cnn.parameters()),
        "macro_f1": metrics["macro_f1"],
        "accuracy": metrics["accuracy"],
        **{key: faith.get(key) for key in ("mass_inside_ratio", "mass_inside_model_over_prior", "topk_iou_ratio",
                                             "topk_iou_model_over_prior")},
        "map_mean": float(attention.mean()),
        "best_epoch": result.best_epoch,
        "best_val_macro_f1": result.best_row["val_macro_f1"],
        "train_seconds": round(seconds, 1),
        "threads": int(os.environ.get("MEDATTN_TRAIN_THREADS", "2")),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rank: mean / std / n of each figure; per R > 0 and figure: the difference to R = 0 and
    whether it lies within 2 standard errors of that difference."""
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        by_rank.setdefault(int(run["pixel_rank"]), []).append(run)
    summary: dict[str, Any] = {}
    for rank in sorted(by_rank, key=lambda r: (r == 0, r)):
        rows = by_rank[rank]
        entry: dict[str, Any] = {"n": len(rows), "seeds": sorted(r["seed"] for r in rows),
                                 "n_pixel_channels": rows[0]["n_pixel_channels"],
                                 "pixel_cnn_parameters": rows[0]["pixel_cnn_parameters"],
                                 "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rows)}
        for key, _ in FIGURES:
            values = [float(r[key]) for r in rows if r.get(key) is not None]
            if values:
                mean, std = _mean_std(values)
                entry[key] = {"mean": mean, "std": std, "n": len(values)}
        summary[str(rank)] = entry
    reference = summary.get("0")
    for rank, entry in summary.items():
        if rank == "0" or reference is None:
            continue
        entry["vs_uncompressed"] = {}
        for key, _ in FIGURES:
            a, b = entry.get(key), reference.get(key)
            if a is None or b is None:
                continue
            difference = a["mean"] - b["mean"]
            standard_error = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
            entry["vs_uncompressed"][key] = {"difference": difference, "standard_error": standard_error,
                                             "within_noise": abs(difference) <= 2 * standard_error}
    return summary


def table(summary: dict[str, Any]) -> str:
    """A Markdown table: one row per rank, mean ± std of each figure (* = not within noise of R = 0)."""
    header = ["R", "NC", "pixel-CNN params", "runs", *[label for _, label in FIGURES], "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, entry in summary.items():
        cells = ["0 (P as is)" if rank == "0" else rank, str(entry["n_pixel_channels"]),
                 f"{entry['pixel_cnn_parameters']:,}", str(entry["n"])]
        for key, _ in FIGURES:
            figure = entry.get(key)
            if figure is None:
                cells.append("n/a")
                continue
            flag = entry.get("vs_uncompressed", {}).get(key)
            mark = " *" if flag is not None and not flag["within_noise"] else ""
            cells.append(f"{figure['mean']:.3f} ± {figure['std']:.3f}{mark}")
        cells.append(f"{entry['train_seconds_mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = summarise(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "runs": runs, "summary": summary}, indent=2))
    tmp.replace(out)
    return summary


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"), help="(default: the checkout's)")
    parser.add_argument("--ranks", default="16,32,64,128,0", help="pixel ranks; 0 = P as is (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="train seeds (default: %(default)s)")
    parser.add_argument("--n-images", type=int, default=0, help="data.synthetic.n_images; 0 = params file's")
    parser.add_argument("--image-size", type=int, default=0, help="data.image_size; 0 = params file's")
    parser.add_argument("--epochs", type=int, default=0, help="train.epochs; 0 = params file's")
    parser.add_argument("--cutoff-epoch", type=int, default=0, help="train.cutoff_epoch (E); 0 = params file's")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at once, in separate processes (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "pixel_rank_sweep" / "sweep.json")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> SweepConfig:
    from medattn.config import load_params

    base = load_params(args.params)
    return SweepConfig(params_path=str(args.params),
                       n_images=args.n_images or base.data.synthetic.n_images,
                       image_size=args.image_size or base.data.image_size,
                       epochs=args.epochs or base.train.epochs,
                       cutoff_epoch=args.cutoff_epoch or base.train.cutoff_epoch)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = config_from(args)
    ranks, seeds = _ints(args.ranks), _ints(args.seeds)
    runs: list[dict[str, Any]] = []
    if args.resume and args.out.is_file():
        previous = json.loads(args.out.read_text())
        if previous.get("config") == asdict(cfg):
            runs = [r for r in previous["runs"] if r["pixel_rank"] in ranks and r["seed"] in seeds]
    done = {(r["pixel_rank"], r["seed"]) for r in runs}
    # the slowest runs (P as is, the largest R) first, so that the workers finish together
    todo = sorted(((rank, seed) for rank in ranks for seed in seeds if (rank, seed) not in done),
                  key=lambda rs: (rs[0] != 0, -rs[0], rs[1]))
    meta = {"config": asdict(cfg), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_at_start": list(os.getloadavg()), "workers": args.workers}
    print(f"pixel-rank sweep: {cfg}; ranks {ranks}, seeds {seeds}; {len(todo)} runs to do, {len(done)} kept")
    with tempfile.TemporaryDirectory() as scratch:
        dataset = prepare(cfg, Path(scratch) / "prepared")
        if args.workers <= 1:
            for rank, seed in todo:
                runs.append(train_and_score(cfg, str(dataset), rank, seed))
                print(_progress(runs[-1]), flush=True)
                _write(args.out, meta, runs)
        else:
            with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(train_and_score, cfg, str(dataset), rank, seed) for rank, seed in todo]
                for future in as_completed(futures):
                    runs.append(future.result())
                    print(_progress(runs[-1]), flush=True)
                    _write(args.out, meta, runs)
    meta["load_average_at_end"] = list(os.getloadavg())
    summary = _write(args.out, meta, sorted(runs, key=lambda r: (r["pixel_rank"], r["seed"])))
    print("\n" + table(summary))
    print("\n* = outside 2 standard errors of R = 0 (not within noise)")
    print(f"written: {args.out}")
    return summary


def _progress(run: dict[str, Any]) -> str:
    return (f"R={run['pixel_rank']:>4} seed={run['seed']}: macro-F1 {run['macro_f1']:.3f} acc {run['accuracy']:.3f} "
            f"mass/uniform {run['mass_inside_ratio']} ({run['train_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
