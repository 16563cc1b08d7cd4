"""A tiny recalibration workspace: a prepared synthetic dataset, a champion in a fresh MLflow, feedback in a store.

Shared by the kill test and the bad-input tests. Everything is small (32 px images, 40 of them,
a random ``small_cnn``), so ``medattn recalibrate`` spends its time importing, not training.
:meth:`RecalWorkspace.medattn` runs the real CLI as a subprocess in the workspace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from medattn.config import load_params
from medattn.data.manifest import read_manifest
from medattn.data.prepare import prepare_dataset
from medattn.feedback.blobs import BlobStore
from medattn.feedback.schema import parse_submission
from medattn.feedback.store import FeedbackStore
from medattn.models.bundle import save_bundle
from medattn.models.factory import ModelSpec, create_model

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "recal-tiny"
IMAGE_SIZE = 32


@dataclass
class RecalWorkspace:
    root: Path
    tracking_uri: str
    champion: str
    feedback_ids: list[str]

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.state_dir / 'feedback.db'}"

    def set_params(self, **recalibrate: Any) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        params["recalibrate"].update(recalibrate)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDATTN_", "MLFLOW_"))}
        env.update(MEDATTN_STATE_DIR=str(self.state_dir), MEDATTN_TRAIN_THREADS="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO_ROOT), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "medattn.cli", *args]

    def medattn(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=self.root, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def open_store(self) -> FeedbackStore:
        return FeedbackStore(self.store_url)

    def registry_state(self) -> dict[str, Any]:
        """Aliases, champion history and version numbers: what a recalibration may change."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        model = client.get_registered_model(MODEL_NAME)
        versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'"))
        return {"aliases": {k: str(v) for k, v in model.aliases.items()},
                "history": model.tags.get("champion_history"), "versions": versions}

    def feedback_state(self) -> list[tuple[str, str | None]]:
        with self.open_store() as store:
            return [(str(r.id), r.consumed_by_retrain) for r in store.list_feedback(limit=1000)]


def make_workspace(root: Path, n_feedback: int = 4, epochs: int = 1) -> RecalWorkspace:
    from medattn.registry import assign_challenger_and_gate, end_run, log_bundle_model, start_pipeline_run

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = {
        "data": {"source": "synthetic", "image_size": IMAGE_SIZE, "synthetic": {"preset": "easy", "n_images": 40}},
        "model": {"backbone": "small_cnn", "attention": "none"},
        "train": {"batch_size": 16, "device": "cpu", "epochs": 1, "cutoff_epoch": 1},
        "mlflow": {"tracking_uri": uri, "experiment": "recal-e2e", "model_name": MODEL_NAME},
        "recalibrate": {"epochs": epochs, "min_feedback": 2, "holdout_fraction": 0.25, "feedback_batch_size": 4},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    parsed = load_params(root / "params.yaml")
    dataset = prepare_dataset(parsed, root / "data" / "prepared", progress=False)
    class_names = tuple(json.loads((dataset / "classes.json").read_text())["class_names"])

    torch.manual_seed(0)
    spec = ModelSpec(backbone="small_cnn", attention="none", num_classes=len(class_names), image_size=IMAGE_SIZE,
                     class_names=class_names)
    bundle = save_bundle(create_model(spec), spec, root / "champion-bundle")
    run_id = start_pipeline_run({"data.source": "synthetic"}, "recal-e2e", uri)
    champion = log_bundle_model(run_id, bundle, MODEL_NAME, tracking_uri=uri, metric=0.5)
    end_run(run_id, uri)
    assert assign_challenger_and_gate(MODEL_NAME, champion, tracking_uri=uri).promoted

    manifest = read_manifest(dataset)
    train_rows = manifest[manifest["split"] == "train"].head(n_feedback)
    blobs = BlobStore(root / "state" / "blobs")
    ids = []
    with FeedbackStore(f"sqlite:///{root / 'state' / 'feedback.db'}") as store:
        for i, row in enumerate(train_rows.itertuples()):
            sha = blobs.put((dataset / row.path).read_bytes())
            submission = parse_submission(json.dumps({
                "model_name": MODEL_NAME, "model_version": champion, "expert_id": "dr-kill",
                "rois": [{"kind": "relevant", "shape": "rectangle", "x": 8, "y": 8, "width": 12, "height": 12},
                         {"kind": "irrelevant", "shape": "rectangle", "x": 0, "y": 24, "width": 8, "height": 8}]}))
            record, _ = store.add_feedback(submission, sha, IMAGE_SIZE, IMAGE_SIZE, f"seed-{i}", caller="dr-kill")
            ids.append(str(record.id))
    return RecalWorkspace(root=root, tracking_uri=uri, champion=champion, feedback_ids=ids)
