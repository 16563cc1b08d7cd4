"""Training throughput of global spatial attention vs the plain image CNN, measured in one run.

Algorithm 1 has two phases with different costs: before the cut-off epoch every step also runs
the pixel CNN over the whole pixel representation P (NC = training images x channels), after
it M is a constant and a step costs what the plain backbone costs. This prints images/s of
each and the ratios to the baseline, on the device that `train.device: auto` would pick.

    python benchmarks/train_benchmark.py --help
"""

from __future__ import annotations

import argparse
import time

import torch

from medattn.models.base import EpochSchedule, LossSettings
from medattn.models.factory import ModelSpec, create_model, spec_for_training
from medattn.devices import resolve_device
from medattn.training.losses import total_loss


def images_per_second(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits, attention = model(x)
        total_loss(logits, y, model.loss_terms(attention, LossSettings(lambda_l1=0.1)))["total"].backward()
        optimizer.step()

    step()  # warm-up (allocations, cuDNN autotune)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="small_cnn", help="image CNN (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=96, help="square input size (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=432, help="N of the pixel representation (default: %(default)s)")
    parser.add_argument("--K", type=int, default=32, help="pixel CNN hidden channels (default: %(default)s)")
    parser.add_argument("--pixel-rank", type=int, default=64,
                        help="R of the compressed pixel representation variant (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="variants are timed in interleaved rounds; the median is reported (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    s, n = args.image_size, args.train_images
    x = torch.randn(args.batch_size, 3, s, s, device=device)
    y = torch.randint(0, 3, (args.batch_size,), device=device)
    train_images = torch.randn(n, 3, s, s)

    def build(attention: str, pixel_rank: int = 0) -> torch.nn.Module:
        spec = ModelSpec(backbone=args.backbone, attention=attention, num_classes=3, image_size=s, K=args.K,
                         pixel_rank=pixel_rank)
        model = create_model(spec_for_training(spec, train_images)).to(device)
        model.before_training(train_images)  # the same hooks fit() calls
        return model

    joint_model, frozen_model = build("global_pixel"), build("global_pixel")
    frozen_model.on_epoch_start(EpochSchedule(epoch=2, epochs=2, cutoff_epoch=1))
    variants = {
        "plain CNN (attention none)": build("none"),
        "global attention, epochs <= E": joint_model,
        "global attention, epochs > E": frozen_model,
        f"global attention R={args.pixel_rank}, <= E": build("global_pixel", args.pixel_rank),
        "MLDAM": build("mldam"),
    }
    # Interleaved rounds: a slow spell of a shared machine hits every variant, not just one.
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, model in variants.items():
            samples[name].append(images_per_second(model, x, y, args.steps))
    median = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
    baseline = median["plain CNN (attention none)"]

    print(f"device {device}, backbone {args.backbone}, {s}x{s}, N={n} (NC={3 * n}), K={args.K}, batch {args.batch_size}")
    print(f"{'variant':34s} {'images/s':>10s} {'vs plain CNN':>13s}")
    for name, value in median.items():
        print(f"{name:34s} {value:10.1f} {value / baseline:13.2f}")


if __name__ == "__main__":
    main()
