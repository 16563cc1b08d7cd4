"""Helpers of the service end-to-end tests: a tiny registered model and a real ``bentoml serve``.

:func:`start_served` writes a token file (one token per role: predict, expert, admin), starts
``bentoml serve serving.service:MedattnService`` from the repo root on a free loopback port with
its own state dir and BentoML home (:class:`tests.server_process.ServerProcess`, which kills
the arbiter *and* its workers, so a SIGKILL really stops everything at once; the durability
test relies on that), and waits for ``/readyz``.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from medattn.models.bundle import save_bundle
from medattn.models.factory import ModelSpec, create_model
from medattn.serving.auth import hash_token
from tests.server_process import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "e2e-tiny"
CLASS_NAMES = ("healthy", "mild", "severe")
IMAGE_SIZE = 32
MAX_UPLOAD_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 2_000_000


def make_tiny_bundle(out_dir: Path, seed: int) -> Path:
    """A small_cnn + global pixel attention model with random weights (different per seed)."""
    torch.manual_seed(seed)
    spec = ModelSpec(backbone="small_cnn", attention="global_pixel", num_classes=len(CLASS_NAMES),
                     image_size=IMAGE_SIZE, class_names=CLASS_NAMES, n_pixel_channels=6, K=8)
    model = create_model(spec)
    model.set_pixel_representation(torch.rand(1, 6, IMAGE_SIZE, IMAGE_SIZE))
    model.freeze()
    return save_bundle(model, spec, out_dir)


def register_version(tracking_uri: str, bundle_dir: Path, metric: float) -> str:
    """Log ``bundle_dir`` in a new run and register it; returns the version (not yet aliased)."""
    from medattn.registry import end_run, log_bundle_model, start_pipeline_run

    run_id = start_pipeline_run({"data.source": "synthetic"}, "e2e", tracking_uri)
    version = log_bundle_model(run_id, bundle_dir, MODEL_NAME, tracking_uri=tracking_uri, metric=metric)
    end_run(run_id, tracking_uri)
    return version


@dataclass
class Served:
    """What a test needs to talk to the running service (and to change its registry)."""

    server: ServerProcess
    tracking_uri: str
    state_dir: Path
    tokens: dict[str, str]
    workdir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def service_env(workdir: Path, tracking_uri: str, tokens: dict[str, str], **overrides: str) -> dict[str, str]:
    """Environment of a server: its own state dir, token file, BentoML home; small limits."""
    tokens_file = workdir / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": [
        {"name": name, "role": name, "sha256": hash_token(token)} for name, token in tokens.items()]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDATTN_", "MLFLOW_", "BENTOML_"))}
    env.update({
        "MEDATTN_TRACKING_URI": tracking_uri,
        "MEDATTN_MODEL_NAME": MODEL_NAME,
        "MEDATTN_STATE_DIR": str(workdir / "state"),
        "MEDATTN_TOKENS_FILE": str(tokens_file),
        "MEDATTN_POLL_SECONDS": "0",
        # one HTTP worker unless a test asks for more: the suite runs several servers at once on
        # few cores (test_service_workers.py covers several workers following one champion)
        "MEDATTN_API_WORKERS": "1",
        "MEDATTN_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "MEDATTN_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "MEDATTN_MAX_BATCH_IMAGES": "4",
        "MEDATTN_TORCH_THREADS": "1",
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "OMP_NUM_THREADS": "1",
    })
    env.update(overrides)
    return env


def start_served(registry: tuple[str, Path], probe: str = "/readyz", **overrides: str) -> Served:
    tracking_uri, workdir = registry
    tokens = {role: secrets.token_urlsafe(24) for role in ("predict", "expert", "admin")}
    server = ServerProcess(service_env(workdir, tracking_uri, tokens, **overrides), workdir / "server.log", REPO_ROOT)
    server.start()
    try:
        server.wait_ready(probe=probe)
    except BaseException:
        server.stop()
        raise
    return Served(server=server, tracking_uri=tracking_uri, state_dir=workdir / "state", tokens=tokens,
                  workdir=workdir)
