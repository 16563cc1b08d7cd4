"""Served vs in-process: what does HTTP + BentoML cost per prediction?

Both sides do the same work per image that a client gets: decode the PNG upload, pre-process it
as in training, run the model, colour-map the attention map back to the image's size, encode it
as PNG and the answer as JSON (``medattn.serving``). In process, ``threads`` callers share one
:class:`Predictor`, with the intra-op thread count the server's model gets
(``MEDATTN_TORCH_THREADS``, default half the cores); served, ``clients`` HTTP clients post to
``/predict`` of a real ``bentoml serve`` on loopback (which also stores each image and
prediction for feedback, as in production), with the model where ``MEDATTN_INFERENCE`` puts it
(default ``auto``; ``--server-env MEDATTN_INFERENCE=runner`` forces the batching runner). The
two sides alternate in ``--rounds`` rounds, so both see the same load.

The HTTP clients run in this process, on the same cores as the server: their CPU (building the
multipart body, parsing the JSON answer) is work the in-process side does not do, and it comes
out of the server's share of the machine. So besides the throughput ratio (the figure the goal
is stated in) the benchmark prints CPU time per image: of the in-process side, of the server's
processes and of the clients, and the ratio in-process CPU / server CPU - what the served
throughput would be relative to in-process if the clients ran elsewhere and the CPU were the
only limit.

Printed per concurrency level: throughput (images/s), p50 and p99 latency, CPU ms per image,
and the ratios, then where the server placed the model and the load average before and after.

By default a model is built at random (``small_cnn`` + global attention, ``--model-size`` px)
and registered as champion in a throw-away MLflow database, so the benchmark needs no setup;
``--tracking-uri`` and ``--model-name`` measure a real registered champion instead.

    python benchmarks/serving_benchmark.py                    # 1 and 8 clients
    python benchmarks/serving_benchmark.py --clients 1 4 8 --requests 400
    python benchmarks/serving_benchmark.py --clients 8 --server-env MEDATTN_API_WORKERS=1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The server launcher is a test harness (tests/server_process.py), not library code: import it
# from the checkout, however this script is started.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@dataclass(frozen=True)
class Level:
    mode: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # CPU per image of the side's own work: in-process callers, or the server's processes
    client_cpu_ms: float  # CPU per image of the HTTP clients (0 in process)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=240, help="timed predictions per level and mode")
    parser.add_argument("--rounds", type=int, default=4,
                        help="in-process and served alternate this many times per level (same load for both)")
    parser.add_argument("--warmup", type=int, default=64,
                        help="untimed predictions before each level (lets the batcher learn its costs)")
    parser.add_argument("--images", type=int, default=32, help="distinct images, cycled")
    parser.add_argument("--image-px", type=int, default=256, help="uploaded images are N x N pixels")
    parser.add_argument("--model-size", type=int, default=96, help="model input size (random model only)")
    parser.add_argument("--backbone", default="small_cnn", help="backbone of the random model (random init)")
    parser.add_argument("--tracking-uri", default=None, help="serve this registry's champion instead")
    parser.add_argument("--model-name", default=None, help="registered model name (with --tracking-uri)")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="extra environment of the server, e.g. MEDATTN_TORCH_THREADS=1")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def make_images(count: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(count):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), xx * yy], axis=2) * 0.5 + 0.5
        pixels = np.clip(base * 200 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def register_random_model(workdir: Path, image_size: int, backbone: str, images: list[bytes]) -> tuple[str, str]:
    import torch

    from medattn.data.preprocess import to_model_input
    from medattn.models.bundle import save_bundle
    from medattn.models.factory import ModelSpec, create_model
    from medattn.registry import assign_challenger_and_gate, end_run, log_bundle_model, start_pipeline_run

    torch.manual_seed(0)
    spec = ModelSpec(backbone=backbone, attention="global_pixel", num_classes=3, image_size=image_size,
                     class_names=("0", "1", "2"), n_pixel_channels=6)
    model = create_model(spec)
    # Seed 001's pixel representation: training images stacked as channels (two images here).
    stacked = [to_model_input(Image.open(io.BytesIO(data)), image_size) for data in images[:2]]
    model.set_pixel_representation(torch.cat(stacked)[None])
    model.freeze()
    bundle = save_bundle(model, spec, workdir / "bundle")
    uri, name = f"sqlite:///{workdir / 'mlflow.db'}", "benchmark-model"
    run_id = start_pipeline_run({}, "benchmark", uri)
    version = log_bundle_model(run_id, bundle, name, tracking_uri=uri, metric=1.0)
    end_run(run_id, uri)
    assign_challenger_and_gate(name, version, tracking_uri=uri)
    return uri, name


def measure(call: Callable[[bytes], None], images: list[bytes], concurrency: int, n_requests: int,
            n_warmup: int, cpu_clock: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0),
            ) -> tuple[float, list[float], tuple[float, float]]:
    """(images/s, per-request latencies in s, CPU seconds spent) with ``concurrency`` callers.

    The warm-up runs on the same threads at the same concurrency, so connections, thread-local
    clients and the server's thread pools exist before the clocks start; ``cpu_clock`` is read
    around the timed requests only.
    """
    with ThreadPoolExecutor(max_workers=concurrency) as pool:

        def run(count: int) -> tuple[float, list[float]]:
            latencies: list[float] = []
            lock = threading.Lock()
            counter = iter(range(count))

            def worker() -> None:
                while True:
                    with lock:
                        index = next(counter, None)
                    if index is None:
                        return
                    started = time.perf_counter()
                    call(images[index % len(images)])
                    elapsed = time.perf_counter() - started
                    with lock:
                        latencies.append(elapsed)

            started = time.perf_counter()
            for future in [pool.submit(worker) for _ in range(concurrency)]:
                future.result()
            return count / (time.perf_counter() - started), latencies

        run(max(n_warmup, concurrency))
        before = cpu_clock()
        throughput, latencies = run(n_requests)
        after = cpu_clock()
        return throughput, latencies, (after[0] - before[0], after[1] - before[1])


def own_cpu_seconds() -> float:
    """CPU time of this process so far, all threads (the in-process callers, or the HTTP clients)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Side:
    """One way of predicting: the call, and the CPU clock of whatever serves it besides this process."""

    call: Callable[[bytes], None]
    server_cpu_seconds: Callable[[], float] | None = None  # None: everything runs in this process

    def cpu_clock(self) -> tuple[float, float]:
        """(this process's CPU seconds, the server's) so far."""
        return own_cpu_seconds(), self.server_cpu_seconds() if self.server_cpu_seconds else 0.0


def measure_interleaved(sides: dict[str, Side], images: list[bytes], concurrency: int,
                        args: argparse.Namespace) -> list[Level]:
    """Each mode in turn, ``--rounds`` times (A B A B ...), pooled per mode.

    Other work on a shared machine comes and goes; measured one after the other, the two sides
    would see different loads and the ratio would mostly measure that. Interleaved, both sample
    the same stretch of time. CPU time is taken around the timed requests of each round only.
    """
    per_round = max(concurrency, args.requests // args.rounds)
    seconds = dict.fromkeys(sides, 0.0)
    own_cpu = dict.fromkeys(sides, 0.0)
    server_cpu = dict.fromkeys(sides, 0.0)
    latencies: dict[str, list[float]] = {mode: [] for mode in sides}
    for round_index in range(args.rounds):
        for mode, side in sides.items():
            throughput, round_latencies, (own, server) = measure(
                side.call, images, concurrency, per_round, args.warmup if round_index == 0 else 0, side.cpu_clock)
            own_cpu[mode] += own
            server_cpu[mode] += server
            seconds[mode] += per_round / throughput
            latencies[mode] += round_latencies
    rows = []
    for mode, side in sides.items():
        count = len(latencies[mode])
        if side.server_cpu_seconds:  # served: the server's own work, and the clients' beside it
            cpu_ms, client_ms = 1000 * server_cpu[mode] / count, 1000 * own_cpu[mode] / count
        else:
            cpu_ms, client_ms = 1000 * own_cpu[mode] / count, 0.0
        rows.append(level(mode, concurrency, count / seconds[mode], latencies[mode], cpu_ms, client_ms))
    return rows


def level(mode: str, concurrency: int, throughput: float, latencies: list[float], cpu_ms: float,
          client_cpu_ms: float) -> Level:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return Level(mode, concurrency, throughput, statistics.median(ordered) * 1000, p99 * 1000, cpu_ms, client_cpu_ms)


def in_process_call(tracking_uri: str, model_name: str, cache: Path, torch_threads: int) -> Callable[[bytes], None]:
    """Decode, model, attention PNG and the JSON body: what a client of /predict receives."""
    import torch

    from medattn.serving.imaging import decode_image
    from medattn.serving.inference import ChampionSlot, build_payload

    # The intra-op threads the server gives its model: with more, this side would get more of
    # the machine per image than the server may take, and the ratio would measure that.
    torch.set_num_threads(torch_threads)
    slot = ChampionSlot(model_name, tracking_uri, cache)
    slot.refresh()
    predictor = slot.current

    def call(data: bytes) -> None:
        image = decode_image(data, "image/png")
        [raw] = predictor.predict([image.image])
        json.dumps(build_payload(raw, image.width, image.height, "in-process"))

    return call


def server_torch_threads(extra_env: dict[str, str]) -> int:
    """The model's intra-op threads in one server worker serving in process (``MEDATTN_TORCH_THREADS``;
    0 = half the cores shared by the API workers, as ``ServingSettings.in_process_torch_threads``)."""
    from medattn.serving.settings import api_workers_from_env, in_process_torch_threads

    configured = int(extra_env.get("MEDATTN_TORCH_THREADS", "0") or 0)
    return in_process_torch_threads(configured, api_workers_from_env(extra_env))


class Server:
    """``bentoml serve`` of the medattn service in the background (the same command as the CLI's)."""

    def __init__(self, workdir: Path, tracking_uri: str, model_name: str, port: int,
                 extra_env: dict[str, str] | None = None) -> None:
        from tests.server_process import ServerProcess

        self.token = secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDATTN_", "BENTOML_"))}
        env.update({"MEDATTN_TRACKING_URI": tracking_uri, "MEDATTN_MODEL_NAME": model_name,
                    "MEDATTN_STATE_DIR": str(workdir / "state"), "MEDATTN_POLL_SECONDS": "0",
                    "MEDATTN_TOKENS": json.dumps({"tokens": [{"name": "bench", "role": "predict",
                                                              "sha256": _sha256(self.token)}]}),
                    "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"})
        env.update(extra_env or {})
        self.log_path = workdir / "server.log"
        self.process = ServerProcess(env, self.log_path, REPO_ROOT, **({"port": port} if port else {}))
        self.process.start()
        self.url = self.process.url

    def wait_ready(self) -> None:
        self.process.wait_ready()

    def stop(self) -> None:
        self.process.stop()

    def cpu_seconds(self) -> float:
        """CPU time of the arbiter and every worker so far (the model runner included)."""
        total = 0.0
        for proc in self.process.processes():
            try:
                times = proc.cpu_times()
            except Exception:  # noqa: BLE001 - a process that just exited: nothing more to count
                continue
            total += times.user + times.system
        return total

    def mean_batch_size(self) -> float | None:
        """Mean size of the batches the runner's dispatcher formed, from BentoML's own histogram."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        totals = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            for kind in totals:
                if line.startswith(f"bentoml_service_adaptive_batch_size_{kind}{{") and "method_name=\"infer\"" in line:
                    totals[kind] += float(line.rsplit(" ", 1)[1])
        return totals["sum"] / totals["count"] if totals["count"] else None

    def placement(self) -> dict | None:
        """Where the server runs the model (``GET /model``: ``inference``, see MEDATTN_INFERENCE)."""
        import httpx

        status = httpx.get(f"{self.url}/model", headers={"Authorization": f"Bearer {self.token}"}, timeout=30).json()
        return status.get("inference")

    def client_call(self) -> Callable[[bytes], None]:
        import httpx

        local = threading.local()
        headers = {"Authorization": f"Bearer {self.token}"}

        def call(data: bytes) -> None:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=self.url, timeout=120, headers=headers)
            response = local.client.post("/predict", files={"image": ("x.png", data, "image/png")})
            if response.status_code != 200:
                raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:300]}")

        return call


def _sha256(token: str) -> str:
    from medattn.serving.auth import hash_token

    return hash_token(token)


def main() -> None:
    args = parse_args()
    images = make_images(args.images, args.image_px)
    with tempfile.TemporaryDirectory(prefix="medattn-bench-") as tmp:
        workdir = Path(tmp)
        if args.tracking_uri:
            if not args.model_name:
                raise SystemExit("--tracking-uri needs --model-name")
            uri, name = args.tracking_uri, args.model_name
        else:
            uri, name = register_random_model(workdir, args.model_size, args.backbone, images)
        extra_env = dict(item.split("=", 1) for item in args.server_env)
        server = Server(workdir, uri, name, args.port, extra_env)
        load_before = os.getloadavg()
        try:
            server.wait_ready()
            sides = {"in-process": Side(in_process_call(uri, name, workdir / "models", server_torch_threads(extra_env))),
                     "served": Side(server.client_call(), server.cpu_seconds)}
            levels = [row for concurrency in args.clients
                      for row in measure_interleaved(sides, images, concurrency, args)]
            batch_size = server.mean_batch_size()
            placement = server.placement()
        except RuntimeError:
            log = server.log_path.read_text(errors="replace")
            print("\n".join(line for line in log.splitlines() if "[INFO]" not in line or "runner" in line)[-20000:])
            raise
        finally:
            server.stop()
    report(levels, args, batch_size, placement, (load_before, os.getloadavg()))


def report(levels: list[Level], args: argparse.Namespace, batch_size: float | None, placement: dict | None,
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    print(f"{args.requests} predictions per row ({args.rounds} interleaved rounds), "
          f"{args.image_px}x{args.image_px} PNG uploads, model "
          f"{args.backbone if not args.tracking_uri else args.model_name} at {args.model_size} px, "
          f"{os.cpu_count()} CPU cores, server env {' '.join(args.server_env) or '(defaults)'}")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load[0])}, "
          f"after {'/'.join(f'{x:.2f}' for x in load[1])}")
    print(f"{'clients':>7}  {'mode':<10}  {'images/s':>9}  {'p50 ms':>8}  {'p99 ms':>8}  {'CPU ms/img':>10}  "
          f"{'client CPU ms':>13}")
    for row in sorted(levels, key=lambda r: (r.concurrency, r.mode)):
        print(f"{row.concurrency:>7}  {row.mode:<10}  {row.throughput:>9.1f}  {row.p50_ms:>8.1f}  {row.p99_ms:>8.1f}  "
              f"{row.cpu_ms:>10.2f}  {row.client_cpu_ms:>13.2f}")
    ratios, cpu_ratios = {}, {}
    for concurrency in args.clients:
        by_mode = {r.mode: r for r in levels if r.concurrency == concurrency}
        served, local = by_mode["served"], by_mode["in-process"]
        ratios[concurrency] = served.throughput / local.throughput
        cpu_ratios[concurrency] = local.cpu_ms / served.cpu_ms if served.cpu_ms else float("nan")
        print(f"served / in-process throughput at {concurrency} client(s): {ratios[concurrency]:.2f}  "
              f"(CPU per image, in-process / server: {cpu_ratios[concurrency]:.2f})")
    if placement is not None:
        chosen = placement.get("placement") or {}
        print(f"server inference mode {placement['mode']}: model served {placement['where']}"
              + (f" ({chosen['reason']})" if chosen else ""))
    if batch_size is not None:
        print(f"mean adaptive batch size of the model runner (all served levels): {batch_size:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"levels": [row.__dict__ for row in levels],
                                         "mean_batch_size": batch_size,
                                         "ratios": {str(k): v for k, v in ratios.items()},
                                         "cpu_ratios": {str(k): v for k, v in cpu_ratios.items()},
                                         "load_average": {"before": load[0], "after": load[1]},
                                         "server_env": args.server_env,
                                         "placement": placement}, indent=2))


if __name__ == "__main__":
    main()
