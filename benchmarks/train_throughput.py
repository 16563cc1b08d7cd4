"""Training throughput (images/s) per backbone: plain, global attention (before / after E, P as is
or compressed), the fast path and packed trials, as ratios to plain eager training measured in one run.

Algorithm 1 has two phases with different costs: before the cut-off epoch E every step also runs
the pixel CNN over the whole pixel representation P (NC = training images x channels; with
``model.pixel_rank: R`` over its R-channel compression instead), after E the map M is a constant
and a step costs what the plain backbone costs. Each variant is timed on the same batches
(forward, backward, Adam) in interleaved rounds, so a slow spell of a shared machine hits every
variant alike; the median round is reported. Packed trials are timed end to end:
``fit_packed`` of P short runs against the same P runs trained one after another by ``fit``.

    python benchmarks/train_throughput.py --quick          # small_cnn at 96 px: the CPU-sized subset
    python benchmarks/train_throughput.py                  # every backbone (224 px), N = 400, 1500, 5000
    python benchmarks/train_throughput.py --backbones resnet50,densenet121 --variants plain,fast
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
from tqdm.auto import tqdm

from medattn.config import ModelParams, TrainParams
from medattn.data.preprocess import normalize_tensor
from medattn.devices import resolve_device
from medattn.models.base import EpochSchedule, LossSettings
from medattn.models.factory import ModelSpec, create_model, spec_for_training
from medattn.training.fast_path import DeviceSplit, FastPath, prepare_model, resolve_fast_path
from medattn.training.fit import LabelledImages, fit, make_deterministic
from medattn.training.losses import total_loss
from medattn.training.packing import fit_packed

ALL_BACKBONES = ("small_cnn", "vgg16", "resnet50", "resnet152", "densenet121", "densenet161", "googlenet")
VARIANTS = ("plain", "fast", "joint", "frozen", "compressed", "packed")
BATCH_POOL = 128  # distinct images the timed steps draw their batches from


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    autocast: Callable[[], ContextManager]
    optimizer: Optional[torch.optim.Optimizer] = field(default=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(variant: Variant, batches: list[torch.Tensor], device: torch.device) -> float:
    """images/s of optimiser steps on ``batches`` (one untimed warm-up step first)."""
    model = variant.model
    if variant.optimizer is None:
        variant.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer = variant.optimizer
    model.train()

    def step(idx: torch.Tensor) -> None:
        x, y = variant.batch(idx)
        optimizer.zero_grad(set_to_none=True)
        with variant.autocast():
            logits, attention = model(x)
            loss = total_loss(logits, y, model.loss_terms(attention, LossSettings(lambda_l1=0.1)))["total"]
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up: allocations, cuDNN autotuning
    _sync(device)
    start = time.perf_counter()
    for idx in batches:
        step(idx)
    _sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def _pixels(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def step_variants(args: argparse.Namespace, backbone: str, size: int, device: torch.device) -> list[Variant]:
    pool = normalize_tensor(_pixels(BATCH_POOL, size, seed=1))
    labels = torch.arange(BATCH_POOL) % 3
    fast = resolve_fast_path("on", device)
    on_device = DeviceSplit(pool, labels, device, channels_last=True)

    def host_batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pool[idx].to(device), labels[idx].to(device)

    plain_autocast: Callable[[], ContextManager] = contextlib.nullcontext

    def fast_autocast() -> ContextManager:
        return fast.autocast(device)

    def build(attention: str, train_images: torch.Tensor, rank: int = 0, frozen: bool = False,
              fast_path: FastPath | None = None) -> torch.nn.Module:
        spec = ModelSpec(backbone=backbone, attention=attention, num_classes=3, image_size=size, K=args.K,
                         pixel_rank=rank)
        model = create_model(spec_for_training(spec, train_images)).to(device)
        if fast_path is not None:
            prepare_model(model, fast_path)
        model.before_training(train_images)  # the hooks fit() calls
        if frozen:
            model.on_epoch_start(EpochSchedule(epoch=2, epochs=2, cutoff_epoch=1))
        return model

    wanted = set(args.variants)
    out: list[Variant] = []
    no_pixels = pool[:1]
    out.append(Variant("plain (attention none)", build("none", no_pixels), host_batch, plain_autocast))
    if "fast" in wanted:
        out.append(Variant("fast path, attention none", build("none", no_pixels, fast_path=fast),
                           on_device.batch, fast_autocast))
    for n in args.train_images:
        if not wanted & {"joint", "frozen", "compressed"}:
            break
        images = normalize_tensor(_pixels(n, size, seed=2))
        if "joint" in wanted:
            out.append(Variant(f"global N={n}, <= E", build("global_pixel", images), host_batch, plain_autocast))
        for rank in args.ranks if "compressed" in wanted else ():
            out.append(Variant(f"global N={n} R={rank}, <= E", build("global_pixel", images, rank),
                               host_batch, plain_autocast))
            if "fast" in wanted:
                out.append(Variant(f"fast, global N={n} R={rank}, <= E",
                                   build("global_pixel", images, rank, fast_path=fast), on_device.batch,
                                   fast_autocast))
        if "frozen" in wanted:
            out.append(Variant(f"global N={n}, > E", build("global_pixel", images, frozen=True), host_batch,
                               plain_autocast))
            if "fast" in wanted:
                out.append(Variant(f"fast, global N={n}, > E",
                                   build("global_pixel", images, frozen=True, fast_path=fast),
                                   on_device.batch, fast_autocast))
        del images
    return out


def measure_steps(args: argparse.Namespace, backbone: str, size: int, device: torch.device) -> None:
    torch.manual_seed(0)
    variants = step_variants(args, backbone, size, device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, BATCH_POOL, (args.batch_size,), generator=g) for _ in range(args.steps)]
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    with tqdm(total=args.rounds * len(variants), desc=f"{backbone} {size}px", unit="variant", leave=False) as bar:
        for _ in range(args.rounds):
            for variant in variants:
                samples[variant.name].append(time_steps(variant, batches, device))
                bar.update(1)
    median = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    baseline = median[variants[0].name]
    print(f"\n{backbone}, {size}x{size}, batch {args.batch_size}, K={args.K}, {args.steps} steps x "
          f"{args.rounds} rounds (median)")
    print(f"{'variant':36s} {'images/s':>10s} {'vs plain':>9s} {'step cost':>10s}")
    for name, value in median.items():
        print(f"{name:36s} {value:10.1f} {value / baseline:9.2f} {baseline / value:9.2f}x")


def measure_packing(args: argparse.Namespace, backbone: str, size: int, device: torch.device) -> None:
    """fit_packed of P short runs vs the same runs one after another (the device's default fast path)."""
    n = args.packed_images
    pixels = _pixels(n + n // 4, size, seed=3)
    images = normalize_tensor(pixels)
    labels = torch.arange(len(images)) % 3
    train = LabelledImages(images[:n], labels[:n])
    val = LabelledImages(images[n:], labels[n:])
    rank = args.ranks[0] if args.ranks else 0
    mp = ModelParams(backbone=backbone, attention="global_pixel", K=args.K, pixel_rank=rank)
    trials = [TrainParams(epochs=args.packed_epochs, cutoff_epoch=1, lr=1e-3, batch_size=args.batch_size,
                          seed=seed, device=str(device)) for seed in range(args.packed)]
    names = ["a", "b", "c"]
    make_deterministic()
    start = time.perf_counter()
    for tp in trials:
        fit(mp, tp, train, val, class_names=names, progress=False)
    _sync(device)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    fit_packed(mp, trials, train, val, class_names=names, progress=False)
    _sync(device)
    packed = time.perf_counter() - start
    work = args.packed * args.packed_epochs * n
    print(f"\npacked trials: {args.packed} x fit({backbone} + global R={mp.pixel_rank}, N={n}, "
          f"{args.packed_epochs} epochs, fast_path {'on' if resolve_fast_path('auto', device).enabled else 'off'})")
    print(f"{'one after another':36s} {work / alone:10.1f} images/s  ({alone:.1f} s)")
    print(f"{'packed (fit_packed)':36s} {work / packed:10.1f} images/s  ({packed:.1f} s)  "
          f"ratio {alone / packed:.2f}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad:
        raise SystemExit(f"error: unknown {what} {bad[0]!r} (choose from {', '.join(allowed)})")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--quick", action="store_true",
                        help="the CPU-sized subset: small_cnn at 96 px, N = 400 and 1500, R = 32 and 64")
    parser.add_argument("--backbones", default=",".join(ALL_BACKBONES),
                        help="comma-separated image CNNs (default: all: %(default)s)")
    parser.add_argument("--image-size", type=int, default=0,
                        help="square input size; 0 = 96 for small_cnn, 224 for the torchvision backbones")
    parser.add_argument("--train-images", default="400,1500,5000",
                        help="N of the pixel representation, comma-separated (default: %(default)s)")
    parser.add_argument("--ranks", default="32,64", help="R of the compressed variants (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all); 'plain' is "
                             "always measured, it is the baseline")
    parser.add_argument("--K", type=int, default=32, help="pixel CNN hidden channels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6,
                        help="timed steps per variant and round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds, median reported (default: %(default)s)")
    parser.add_argument("--packed", type=int, default=3, help="runs packed together (default: %(default)s)")
    parser.add_argument("--packed-images", type=int, default=400, help="N of each packed run (default: %(default)s)")
    parser.add_argument("--packed-epochs", type=int, default=2, help="epochs of each packed run (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    args = parser.parse_args()
    backbones = _names(args.backbones, ALL_BACKBONES, "backbone")
    args.variants = _names(args.variants, VARIANTS, "variant")
    args.train_images, args.ranks = _ints(args.train_images), _ints(args.ranks)
    if args.quick:
        backbones, args.train_images = ["small_cnn"], [n for n in args.train_images if n <= 1500]

    device = resolve_device(args.device)
    threads = make_deterministic()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()})")
    print(f"device {device}: {where}, torch {torch.__version__}, {threads} threads")
    for backbone in backbones:
        size = args.image_size or (96 if backbone == "small_cnn" else 224)
        measure_steps(args, backbone, size, device)
        if "packed" in args.variants:
            measure_packing(args, backbone, size, device)


if __name__ == "__main__":
    main()
