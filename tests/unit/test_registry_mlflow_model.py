"""The registered model is a real MLflow model: ``models:/<name>/<version>`` loads and serves.

One tiny random-init bundle is registered in a tmp sqlite registry for the module; the
pyfunc's probabilities must equal the bundle model's own forward pass, both in-process
(``mlflow.pyfunc.load_model``) and over HTTP (``mlflow models serve --env-manager local``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from medattn.registry import (
    download_model_version,
    end_run,
    log_bundle_model,
    start_pipeline_run,
)
from medattn.registry.pyfunc import RUNTIME_DISTRIBUTIONS, pip_requirements

MODEL_NAME = "served-model"
IMAGE_SIZE = 16
SERVE_READY_S = 150.0  # mlflow CLI + a uvicorn worker importing torch, on a busy 2-core machine
SERVE_STOP_S = 15.0


@dataclass(frozen=True)
class Registered:
    tracking_uri: str
    version: str
    bundle_dir: Path
    images: np.ndarray
    expected: np.ndarray  # the bundle model's own softmax(logits) on ``images``


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Registered:
    import torch

    from medattn.data.preprocess import normalize_tensor
    from medattn.models.bundle import save_bundle
    from medattn.models.factory import ModelSpec, create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("mlflow-model")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = ModelSpec(backbone="small_cnn", attention="none", num_classes=3, image_size=IMAGE_SIZE,
                     class_names=("a", "b", "c"))
    model = create_model(spec).eval()
    bundle_dir = save_bundle(model, spec, root / "bundle")
    images = np.random.default_rng(7).random((3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        logits, _attention = model(normalize_tensor(torch.from_numpy(images), spec.mean, spec.std))
        expected = torch.softmax(logits, dim=1).numpy()
    run_id = start_pipeline_run({"data.source": "synthetic"}, "unit-mlflow-model", tracking_uri)
    version = log_bundle_model(run_id, bundle_dir, MODEL_NAME, tracking_uri=tracking_uri, metric=0.5)
    end_run(run_id, tracking_uri)
    return Registered(tracking_uri, version, bundle_dir, images, expected)


@pytest.fixture
def registry_env(registered: Registered, monkeypatch) -> dict[str, str]:
    """``models:/`` URIs resolve against MLflow's environment variables, as a user's shell would."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, registered.tracking_uri)
    return dict(os.environ)


def test_registry_uri_loads_as_pyfunc_and_predicts_the_bundles_own_probabilities(registered, registry_env):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{registered.version}")
    probabilities = model.predict(registered.images)
    assert probabilities.shape == (3, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, registered.expected, rtol=1e-5, atol=1e-6)


def test_logged_model_carries_its_code_and_installable_pins(registered, tmp_path: Path):
    local_bundle, _ = download_model_version(MODEL_NAME, registered.version, tmp_path,
                                             tracking_uri=registered.tracking_uri)
    model_dir = local_bundle.parents[1]
    assert (model_dir / "code" / "medattn" / "registry" / "pyfunc.py").is_file()
    assert not list(model_dir.rglob("__pycache__"))  # saving ran the code; its bytecode stays out

    # A fresh interpreter, run outside any checkout, loads the model's own copy of medattn
    # (not the installed project) and predicts with it.
    np.save(tmp_path / "images.npy", registered.images)
    script = (
        "import sys, numpy, mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "numpy.save(sys.argv[3], model.predict(numpy.load(sys.argv[2])))\n"
        "import medattn; print(medattn.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).is_relative_to(model_dir / "code")
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), registered.expected, rtol=1e-5, atol=1e-6)

    requirements = (model_dir / "requirements.txt").read_text().split()
    assert requirements == pip_requirements()
    assert requirements == [f"{dist}=={metadata.version(dist)}" for dist in RUNTIME_DISTRIBUTIONS]
    assert not [line for line in requirements if line.startswith("medattn")]  # on no index


def test_mlflow_models_serve_answers_invocations_with_the_same_probabilities(registered, registry_env, tmp_path):
    import httpx

    from tests.server_process import free_port

    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}/{registered.version}",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    base = f"http://127.0.0.1:{port}"
    # `mlflow models serve` runs `uvicorn` from PATH: the interpreter's own bin folder goes first,
    # as in an activated virtualenv (pytest may be started as .venv/bin/python -m pytest)
    env = {**registry_env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), registry_env.get("PATH", "")])}
    with open(log_path, "wb") as log:
        # A session of its own: the CLI starts uvicorn workers, and the whole group is stopped.
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        _wait_until_ready(server, base, log_path)
        response = httpx.post(f"{base}/invocations", json={"inputs": registered.images.tolist()}, timeout=60.0)
        assert response.status_code == 200, response.text
        predictions = np.asarray(response.json()["predictions"], dtype=np.float32)
        np.testing.assert_allclose(predictions, registered.expected, rtol=1e-5, atol=1e-6)

        wrong_size = np.zeros((1, 3, IMAGE_SIZE // 2, IMAGE_SIZE // 2), np.float32)
        rejected = httpx.post(f"{base}/invocations", json={"inputs": wrong_size.tolist()}, timeout=60.0)
        assert rejected.status_code >= 400 and f"(B, 3, {IMAGE_SIZE}, {IMAGE_SIZE})" in rejected.text
    finally:
        _stop(server)
    assert server.poll() is not None


def _wait_until_ready(server: subprocess.Popen, base: str, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + SERVE_READY_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/ping", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve not ready after {SERVE_READY_S:.0f}s:\n{log_path.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (workers too); SIGKILL it if it has not exited in time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=SERVE_STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=SERVE_STOP_S)
