"""The proof of issue 9: expert ROIs on <= 10% of the training images undo a learned shortcut.

Per seed and per attention model (``input_attention``, seed 002; ``global_pixel``, seed 001):

1. **shortcut**: the benchmark preset with its decoy on (``data.synthetic.decoy_probability``:
   a cyan stamp on the top-grade *training* images) is prepared, trained by the train stage's
   library code (``run_training`` -> ``fit``), evaluated and registered as ``champion`` in a real
   MLflow registry exactly as the register stage does (``register_bundle``);
2. **ceiling**: the same model trained (``fit``) on the same set prepared without any decoy;
3. **experts**: a real ``bentoml serve`` of that champion (``tests/server_process.py``) receives,
   through ``POST /feedback``, ROIs drawn from ground truth on at most ``--roi-share`` of the
   training images: the lesion mask as a *relevant* brush, the decoy square as an *irrelevant*
   rectangle. Then ONE scheduled recalibration, ``medattn recalibrate --if-needed`` (its rule
   met: ``recalibrate.min_feedback`` = the number of records sent), exports the snapshot,
   fine-tunes the champion with the feedback loss and registers the ``challenger``;
4. **measure** shortcut, challenger and ceiling on the **decoy-free test split**: the prepared set
   without the decoy holds the very same test images (same ids, labels and, for test images the
   stamp missed, the same bytes: checked), so its test split is the decoy set's test split with
   the stamp removed. Attention mass on the decoy is measured on those test images with the
   stamp put back on every one of them; mass inside the lesion masks on the decoy-free ones.

Writes ``<out>/proof.json``, ``<out>/proof.md`` (mean ± std over seeds) and before/after overlay
pictures ``<out>/figures/proof_<model>_seed<seed>.png``.

    python benchmarks/recalibration_proof.py --quick            # 1 seed, smaller, minutes
    python benchmarks/recalibration_proof.py --seeds 0 1 2 --decoy-size 0.12   # the reported figure
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# the server launcher is a test harness (tests/server_process.py), imported from the checkout
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from medattn.config import Params, load_params  # noqa: E402
from medattn.data.synthetic_fundus import DECOY_COLOUR, DECOY_SIZE, decoy_box  # noqa: E402

MODELS = ("input_attention", "global_pixel")
EXPERT = "proof-expert"


@dataclass(frozen=True)
class ProofConfig:
    """Sizes of one proof run (``--quick`` shrinks them)."""

    n_images: int = 400
    image_size: int = 64
    epochs: int = 20
    cutoff_epoch: int = 8
    roi_share: float = 0.10
    decoy_probability: float = 1.0
    # the preset's stamp (0.07 of the side). The reported run passes --decoy-size 0.12 (REPORTED_DECOY_SIZE)
    decoy_size: float = DECOY_SIZE
    recal_epochs: int = 10
    recal_lr: float = 0.001
    # params.yaml's 5 lowered input attention's decoy mass 18x on seed 1 yet every stamped test image
    # was still called top grade (a soft map scales the stamp, the image CNN still reads it); 50
    # undid it there (top-grade recall 0 -> 64%). Measured on seed 1 before the 3-seed run.
    gamma: float = 50.0
    # the demo's calibrated training params (params.yaml after s-calib: lr, lambda, pixel_rank,
    # 20 epochs), pinned so that a later change of params.yaml does not silently change what the
    # proof trains. With the old lambda 0.1 the global map's M went to 0 on the decoy corner.
    lr: float = 0.001
    lambda_l1: float = 0.01
    pixel_rank: int = 64


#: the stamp of the reported run (``--decoy-size 0.12``): the largest that stays in the black corner
#: outside the fundus circle. At the preset's 0.07 the global map learnt a fundus mask with M = 0 on
#: the corner (seed 1, measured), so there was no shortcut to undo; at 0.12 it is learnt (top-grade
#: recall 0 without the stamp, every stamped test image called top grade). Not the default, so the
#: proof's helpers keep the preset's stamp unless told otherwise.
REPORTED_DECOY_SIZE = 0.12

QUICK = ProofConfig(n_images=240, image_size=48, epochs=4, cutoff_epoch=3, recal_epochs=2)


# -- params ------------------------------------------------------------------------------------


def proof_params(base: Params, cfg: ProofConfig, seed: int, model: str, decoy: bool, tracking_uri: str,
                 model_name: str, min_feedback: int = 1) -> Params:
    """The benchmark preset at the proof's size, with or without the decoy, for one seed and model."""
    data = base.data
    synthetic = replace(data.synthetic, preset="benchmark", n_images=cfg.n_images, seed=data.synthetic.seed + seed,
                        decoy_probability=cfg.decoy_probability if decoy else 0.0, decoy_size=cfg.decoy_size)
    return replace(
        base,
        data=replace(data, source="synthetic", image_size=cfg.image_size, synthetic=synthetic),
        model=replace(base.model, attention=model, backbone="small_cnn", pretrained_weights=None,
                      pixel_rank=cfg.pixel_rank),
        train=replace(base.train, epochs=cfg.epochs, cutoff_epoch=min(cfg.cutoff_epoch, cfg.epochs), seed=seed,
                      device="cpu", lr=cfg.lr, lambda_l1=cfg.lambda_l1),
        mlflow=replace(base.mlflow, tracking_uri=tracking_uri, experiment="recalibration-proof", model_name=model_name),
        recalibrate=replace(base.recalibrate, gamma=cfg.gamma, epochs=cfg.recal_epochs, lr=cfg.recal_lr,
                            min_feedback=min_feedback, auto_promote=False),
    )


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


# -- the simulated experts ---------------------------------------------------------------------


def choose_roi_images(train_ids: list[str], share: float, seed: int) -> list[str]:
    """Which training images get ROIs: ``floor(share * n)`` of them, drawn with ``seed``."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"--roi-share must be in (0, 1], got {share}")
    count = int(np.floor(share * len(train_ids)))
    if count < 1:
        raise ValueError(f"{share:.0%} of {len(train_ids)} training images is no image at all")
    rng = np.random.default_rng([seed, 9])
    return sorted(rng.choice(sorted(train_ids), size=count, replace=False).tolist())


def simulated_rois(lesion_mask: np.ndarray, image_size: int, decoy_size: float = DECOY_SIZE) -> list[dict[str, Any]]:
    """What an expert who knows the ground truth draws: lesions relevant (brush), the decoy irrelevant.

    The decoy square is marked on every chosen image, stamped or not: the expert says "never look
    at the scanner-stamp corner", which is what a real reviewer would say once they saw it.
    """
    r0, r1, c0, c1 = decoy_box(image_size, decoy_size)
    rois: list[dict[str, Any]] = [{"shape": "rectangle", "kind": "irrelevant", "x": c0, "y": r0,
                                   "width": c1 - c0, "height": r1 - r0}]
    lesion = np.asarray(lesion_mask, dtype=bool)
    if lesion.any():
        buffer = io.BytesIO()
        Image.fromarray(lesion.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
        rois.append({"shape": "brush", "kind": "relevant",
                     "mask_png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")})
    return rois


def send_feedback(url: str, token: str, model_name: str, version: str, image_png: bytes,
                  rois: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One ``POST /feedback`` (multipart: the submission + the image); the receipt."""
    import httpx

    submission = {"model_name": model_name, "model_version": version, "expert_id": EXPERT, "rois": rois,
                  "comment": "recalibration proof: ROIs from ground truth"}
    response = httpx.post(f"{url}/feedback", headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
                          files={"image": ("image.png", image_png, "image/png")},
                          data={"feedback": json.dumps(submission)}, timeout=60)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"POST /feedback answered {response.status_code}: {response.text[:300]}")
    return response.json()


# -- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestImages:
    """The decoy-free test split, the same images with the decoy on each, and the lesion masks."""

    clean: torch.Tensor  # uint8 (N, 3, H, W)
    stamped: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor  # uint8 (N, 1, H, W), 1 = lesion
    has_mask: torch.Tensor
    decoy_size: float = DECOY_SIZE


def stamp_decoy(images: torch.Tensor, decoy_size: float = DECOY_SIZE) -> torch.Tensor:
    """Every image with the decoy square painted, as ``synthetic_fundus`` stamps it."""
    out = images.clone()
    r0, r1, c0, c1 = decoy_box(images.shape[-1], decoy_size)
    out[:, :, r0:r1, c0:c1] = torch.tensor(DECOY_COLOUR, dtype=out.dtype)[None, :, None, None]
    return out


def decoy_region(image_size: int, decoy_size: float = DECOY_SIZE) -> torch.Tensor:
    region = torch.zeros(1, 1, image_size, image_size, dtype=torch.bool)
    r0, r1, c0, c1 = decoy_box(image_size, decoy_size)
    region[..., r0:r1, c0:c1] = True
    return region


@torch.no_grad()
def measure_model(model: torch.nn.Module, spec: Any, test: TestImages, batch_size: int = 64) -> dict[str, float]:
    """Decoy-free test accuracy / macro-F1, attention share on the decoy and inside lesion masks."""
    from sklearn.metrics import f1_score

    from medattn.data.preprocess import normalize_tensor
    from medattn.evaluation.faithfulness import attention_mass_inside

    model.eval()
    preds, stamped_preds, clean_maps, stamped_maps = [], [], [], []
    for start in range(0, len(test.labels), batch_size):
        part = slice(start, start + batch_size)
        logits, attention = model(normalize_tensor(test.clean[part], spec.mean, spec.std))
        preds.append(logits.argmax(1))
        clean_maps.append(attention.expand(logits.shape[0], -1, -1, -1).float())
        stamped_logits, on_stamped = model(normalize_tensor(test.stamped[part], spec.mean, spec.std))
        stamped_preds.append(stamped_logits.argmax(1))
        stamped_maps.append(on_stamped.expand(logits.shape[0], -1, -1, -1).float())
    pred, pred_stamped = torch.cat(preds).numpy(), torch.cat(stamped_preds).numpy()
    labels = test.labels.numpy()
    # the shortcut itself: the decoy says "top grade" in training. A model that learnt it calls
    # every stamped image top grade and misses top-grade images without it; the attention mass
    # on the decoy can fall while a faint decoy still decides (a soft map scales, it never erases)
    top = int(logits.shape[1]) - 1
    is_top = labels == top
    stamped = torch.cat(stamped_maps)
    region = decoy_region(test.clean.shape[-1], test.decoy_size).to(stamped.dtype)
    decoy_share = (stamped * region).flatten(1).sum(1) / stamped.flatten(1).sum(1).clamp_min(1e-12)
    lesion_share = attention_mass_inside(torch.cat(clean_maps)[:, 0].numpy(), test.masks[:, 0].numpy())
    return {"accuracy": float((pred == labels).mean()),
            "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
            "decoy_mass": float(decoy_share.mean()),
            "lesion_mass": float(np.nanmean(lesion_share[test.has_mask.numpy()])),
            "decoy_area_share": float(region.mean()),
            "top_recall": float((pred[is_top] == top).mean()) if is_top.any() else float("nan"),
            "stamped_top_share": float((pred_stamped == top).mean())}


def load_test_images(clean_dir: Path, decoy_dir: Path, decoy_size: float = DECOY_SIZE) -> TestImages:
    """The decoy-free test split; checks it is the decoy set's test split without the stamp."""
    from medattn.data.dataset import load_split
    from medattn.data.manifest import read_manifest

    clean = load_split(clean_dir, "test", with_masks=True)
    with_decoy = load_split(decoy_dir, "test", with_masks=False)
    if clean.ids != with_decoy.ids or not torch.equal(clean.labels, with_decoy.labels):
        raise RuntimeError("the decoy-free set's test split is not the decoy set's (ids or labels differ)")
    frame = read_manifest(decoy_dir).set_index("id")
    unstamped = [i for i, name in enumerate(clean.ids) if not int(frame.at[name, "has_decoy"])]
    if not torch.equal(clean.images[unstamped], with_decoy.images[unstamped]):
        raise RuntimeError("test images without the stamp differ between the two sets")
    return TestImages(clean.images, stamp_decoy(clean.images, decoy_size), clean.labels, clean.masks, clean.has_mask,
                      decoy_size)


def overlay_figure(image: torch.Tensor, maps: list[tuple[str, np.ndarray]], title: str, path: Path,
                   decoy_size: float = DECOY_SIZE) -> Path:
    """Image | map over image for each model state (the decoy square outlined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    picture = image.permute(1, 2, 0).numpy()
    r0, r1, c0, c1 = decoy_box(picture.shape[0], decoy_size)
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.3 * (1 + len(maps)), 2.6))
    axes[0].imshow(picture)
    axes[0].set_title("test image + decoy", fontsize=8)
    for ax, (name, values) in zip(axes[1:], maps):
        ax.imshow(picture)
        ax.imshow(values / max(float(values.max()), 1e-12), cmap="jet", alpha=0.55, vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="white", lw=0.8))
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- one seed, one model -----------------------------------------------------------------------


def _labelled(dataset_dir: Path, split: str, spec: Any = None):
    from medattn.data.dataset import load_split
    from medattn.data.preprocess import normalize_tensor
    from medattn.training.fit import LabelledImages

    tensors = load_split(dataset_dir, split, with_masks=False)
    norm = normalize_tensor(tensors.images) if spec is None else normalize_tensor(tensors.images, spec.mean, spec.std)
    return LabelledImages(norm, tensors.labels), tensors.class_names


def _log(message: str) -> None:
    print(f"[proof {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def medattn_command() -> list[str]:
    script = Path(sys.executable).with_name("medattn")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from medattn.cli import app; app()"]


def run_case(base: Params, cfg: ProofConfig, seed: int, model: str, work: Path, figures_dir: Path) -> dict[str, Any]:
    """Shortcut -> served champion -> ROIs via /feedback -> one scheduled recalibration; figures."""
    from medattn.data.dataset import load_split
    from medattn.data.prepare import prepare_dataset
    from medattn.models.bundle import load_bundle
    from medattn.registry import download_model_version
    from medattn.registry.pipeline import register_bundle
    from medattn.serving.auth import hash_token
    from medattn.training.fit import evaluate_split, fit
    from medattn.training.run import TrainOutputs, run_training
    from tests.server_process import ServerProcess

    case = work / f"{model}-seed{seed}"
    case.mkdir(parents=True, exist_ok=True)
    done = case / "case.json"
    if done.is_file():  # a finished case of an earlier run in the same --workdir, with the same config
        previous = json.loads(done.read_text())
        if previous.get("config") == asdict(cfg):
            _log(f"{model} seed {seed}: reusing the finished case in {case}")
            return previous["case"]
    uri = f"sqlite:///{case / 'mlflow.db'}"
    model_name = f"proof-{model.replace('_', '-')}"
    decoy_params = proof_params(base, cfg, seed, model, True, uri, model_name)
    clean_params = proof_params(base, cfg, seed, model, False, uri, model_name)
    decoy_dir, clean_dir = work / f"data-seed{seed}-decoy", work / f"data-seed{seed}-clean"
    for params, folder in ((decoy_params, decoy_dir), (clean_params, clean_dir)):
        if not (folder / "manifest.csv").is_file():
            _log(f"seed {seed}: preparing {folder.name} ({cfg.n_images} images, {cfg.image_size} px)")
            prepare_dataset(params, folder, progress=False)
    test = load_test_images(clean_dir, decoy_dir, cfg.decoy_size)
    started = time.perf_counter()

    # 1. the shortcut model: train stage -> evaluate on the set's own test split -> register stage
    _log(f"{model} seed {seed}: training the shortcut model (decoy on)")
    outputs = TrainOutputs(bundle_dir=case / "model", report_dir=case / "train", checkpoint_dir=case / "checkpoints")
    os.environ["MEDATTN_TRACKING_URI"] = uri
    shortcut = run_training(decoy_params, decoy_dir, outputs, progress=False)
    own_test, _ = _labelled(decoy_dir, "test", shortcut.spec)
    own = evaluate_split(shortcut.model, own_test, 64, torch.device("cpu"))
    (case / "evaluate").mkdir(exist_ok=True)
    (case / "evaluate" / "metrics.json").write_text(json.dumps({"macro_f1": own["macro_f1"], "accuracy": own["acc"]}))
    decision = register_bundle(decoy_params, outputs.bundle_dir, case / "evaluate" / "metrics.json",
                               outputs.report_dir / "mlflow_run.json", case / "register.json")
    champion_version = str(decision["version"])
    before = measure_model(shortcut.model, shortcut.spec, test)

    # 2. the ceiling: the same model, the same images, no decoy anywhere
    _log(f"{model} seed {seed}: training the no-decoy ceiling")
    train_clean, class_names = _labelled(clean_dir, "train")
    val_clean, _ = _labelled(clean_dir, "val")
    ceiling_fit = fit(clean_params.model, clean_params.train, train_clean, val_clean, class_names=class_names,
                      progress=False)
    ceiling = measure_model(ceiling_fit.model, ceiling_fit.spec, test)

    # 3. simulated experts through the real /feedback API of a real bentoml serve of the champion
    train_split = load_split(decoy_dir, "train", with_masks=True)
    chosen = choose_roi_images(train_split.ids, cfg.roi_share, seed)
    token = secrets.token_urlsafe(24)
    state_dir = case / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDATTN_", "MLFLOW_", "BENTOML_"))}
    env.update({"MEDATTN_TRACKING_URI": uri, "MEDATTN_MODEL_NAME": model_name, "MEDATTN_STATE_DIR": str(state_dir),
                "MEDATTN_POLL_SECONDS": "0", "MEDATTN_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
                "MEDATTN_TOKENS": json.dumps({"tokens": [{"name": EXPERT, "role": "expert", "sha256": hash_token(token)}]}),
                "BENTOML_HOME": str(case / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    _log(f"{model} seed {seed}: serving champion v{champion_version}, sending ROIs on {len(chosen)} of "
         f"{len(train_split.ids)} training images")
    server = ServerProcess(env, case / "server.log", REPO_ROOT)
    server.start()
    receipts = []
    try:
        server.wait_ready()
        position = {name: i for i, name in enumerate(train_split.ids)}
        for name in chosen:
            i = position[name]
            png = (decoy_dir / "images" / f"{name}.png")
            image_bytes = png.read_bytes() if png.is_file() else _png_bytes(train_split.images[i])
            rois = simulated_rois(train_split.masks[i, 0].numpy() > 0, cfg.image_size, cfg.decoy_size)
            receipts.append(send_feedback(server.url, token, model_name, champion_version, image_bytes, rois,
                                          key=f"proof-{seed}-{model}-{name}"))
    finally:
        server.stop()

    # 4. ONE scheduled recalibration: --if-needed, its rule met by min_feedback = records sent
    recal_params = write_params(replace(decoy_params, recalibrate=replace(decoy_params.recalibrate,
                                                                          min_feedback=len(receipts))),
                                case / "params.yaml")
    command = [*medattn_command(), "recalibrate", "--if-needed", "--params", str(recal_params),
               "--state-dir", str(state_dir), "--snapshot", str(case / "feedback"), "--data", str(decoy_dir),
               "--actor", EXPERT]
    _log(f"{model} seed {seed}: {' '.join(command[-11:])}")
    recal_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(command, cwd=case, env=recal_env, capture_output=True, text=True)
    (case / "recalibrate.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0 or "not started" in completed.stdout:
        raise RuntimeError(f"medattn recalibrate failed ({completed.returncode}): "
                           f"{(completed.stdout + completed.stderr)[-800:]}")
    result = json.loads((case / "reports" / "recalibrate" / "result.json").read_text())
    challenger_dir, _ = download_model_version(model_name, "challenger", case / "challenger", tracking_uri=uri)
    challenger, challenger_spec = load_bundle(challenger_dir)
    after = measure_model(challenger, challenger_spec, test)

    example = _example_index(test)
    with torch.no_grad():
        maps = []
        for name, net, spec in (("shortcut (before)", shortcut.model, shortcut.spec),
                                ("recalibrated (after)", challenger, challenger_spec),
                                ("no-decoy ceiling", ceiling_fit.model, ceiling_fit.spec)):
            from medattn.data.preprocess import normalize_tensor

            net.eval()
            _, att = net(normalize_tensor(test.stamped[example:example + 1], spec.mean, spec.std))
            maps.append((name, att[0, 0].numpy()))
    figure = overlay_figure(test.stamped[example], maps, f"{model}, seed {seed}",
                            figures_dir / f"proof_{model}_seed{seed}.png", cfg.decoy_size)
    outcome = {"seed": seed, "model": model, "before": before, "after": after, "ceiling": ceiling,
            "roi_images": len(chosen), "train_images": len(train_split.ids),
            "roi_share": len(chosen) / len(train_split.ids), "feedback_ids": [r["id"] for r in receipts],
            "champion_version": champion_version, "challenger_version": result["version"],
            "gate": {"eligible": result["eligible"], "reason": result["reason"], "mechanism": result["mechanism"],
                     "consumed": result["consumed"], "held_out": len(result["held_out_ids"])},
            "registered_test_macro_f1": own["macro_f1"], "figure": f"figures/{figure.name}",  # relative to the report folder
            "seconds": round(time.perf_counter() - started, 1)}
    done.write_text(json.dumps({"config": asdict(cfg), "case": outcome}, indent=2))
    return outcome


def _png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _example_index(test: TestImages) -> int:
    """The first top-grade test image with a lesion mask: the one the shortcut misreads."""
    top = int(test.labels.max())
    for i in range(len(test.labels)):
        if int(test.labels[i]) == top and bool(test.has_mask[i]):
            return i
    return 0


# -- the report --------------------------------------------------------------------------------

FIGURES = (("accuracy", "decoy-free test accuracy", 100.0), ("macro_f1", "decoy-free test macro-F1", 100.0),
           ("decoy_mass", "attention mass on the decoy (%)", 100.0),
           ("lesion_mass", "attention mass inside lesion masks (%)", 100.0),
           ("top_recall", "top-grade recall, decoy-free test (%)", 100.0),
           ("stamped_top_share", "test images called top grade with the decoy stamped (%)", 100.0))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(statistics.fmean(values)), float(statistics.stdev(values)) if len(values) > 1 else 0.0


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds per model, and the goal's three checks."""
    summary: dict[str, Any] = {}
    for model in sorted({c["model"] for c in cases}, key=lambda m: MODELS.index(m) if m in MODELS else 99):
        rows = [c for c in cases if c["model"] == model]
        out: dict[str, Any] = {"seeds": [c["seed"] for c in rows]}
        for key, _, scale in FIGURES:
            if any(key not in c[state] for c in rows for state in ("before", "after", "ceiling")):
                continue  # a figure the report's cases were not measured with (older reports)
            for state in ("before", "after", "ceiling"):
                out[f"{state}_{key}"] = _mean_std([c[state][key] * scale for c in rows])
        out["roi_share_percent"] = _mean_std([c["roi_share"] * 100 for c in rows])
        after, before, ceiling = out["after_accuracy"][0], out["before_accuracy"][0], out["ceiling_accuracy"][0]
        decoy_ratio = [c["before"]["decoy_mass"] / max(c["after"]["decoy_mass"], 1e-12) for c in rows]
        out["decoy_mass_ratio"] = _mean_std(decoy_ratio)
        out["decoy_mass_ratio_min"] = min(decoy_ratio)  # the goal is per seed; a near-0 "after" blows up the mean
        out["goal"] = {"within_3_points_of_ceiling": bool(ceiling - after <= 3.0),
                       "15_points_above_shortcut": bool(after - before >= 15.0),
                       "decoy_mass_down_5x": bool(min(decoy_ratio) >= 5.0)}
        summary[model] = out
    return summary


def per_seed_table(cases: list[dict[str, Any]]) -> str:
    """Per model and seed: accuracy, top-grade recall, stamped images called top grade, decoy mass, gate."""
    seeds = sorted({c["seed"] for c in cases})
    models = sorted({c["model"] for c in cases}, key=lambda m: MODELS.index(m) if m in MODELS else 99)
    pct = lambda c, state, key: f"{100 * c[state][key]:.0f}" if key in c[state] else "-"  # noqa: E731
    lines = ["Per seed (decoy-free test accuracy % shortcut / recalibrated / ceiling; top-grade recall % and "
             "stamped test images called top grade %, shortcut -> recalibrated (ceiling); decoy mass % "
             "shortcut -> recalibrated; gate):", "",
             "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for model in models:
        cells = []
        for seed in seeds:
            c = next((c for c in cases if c["model"] == model and c["seed"] == seed), None)
            if c is None:
                cells.append("")
                continue
            cells.append(f"{pct(c, 'before', 'accuracy')} / {pct(c, 'after', 'accuracy')} / "
                         f"{pct(c, 'ceiling', 'accuracy')}; recall {pct(c, 'before', 'top_recall')} -> "
                         f"{pct(c, 'after', 'top_recall')} ({pct(c, 'ceiling', 'top_recall')}); stamped "
                         f"{pct(c, 'before', 'stamped_top_share')} -> {pct(c, 'after', 'stamped_top_share')} "
                         f"({pct(c, 'ceiling', 'stamped_top_share')}); decoy {100 * c['before']['decoy_mass']:.3f} -> "
                         f"{100 * c['after']['decoy_mass']:.3f}; "
                         + ("eligible" if c["gate"]["eligible"] else "not eligible"))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(summary: dict[str, Any], cfg: ProofConfig) -> str:
    def cell(pair: tuple[float, float], digits: int = 1) -> str:
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    lines = ["| model | figure | shortcut (before) | recalibrated (after) | no-decoy ceiling |",
             "|---|---|---|---|---|"]
    for model, out in summary.items():
        for key, label, _ in FIGURES:
            if f"before_{key}" not in out:
                continue
            digits = 2 if "mass" in key else 1
            lines.append(f"| {model} | {label} | {cell(out[f'before_{key}'], digits)} | "
                         f"{cell(out[f'after_{key}'], digits)} | {cell(out[f'ceiling_{key}'], digits)} |")
        lines.append(f"| {model} | training images with ROIs (%) | {cell(out['roi_share_percent'])} | | |")
        goal = out["goal"]
        lines.append(f"| {model} | goal: after within 3 pts of ceiling / >= 15 pts above shortcut / decoy mass "
                     f"down >= 5x (measured: at least {out['decoy_mass_ratio_min']:.1f}x on every seed) | "
                     + " / ".join("met" if goal[k] else "NOT met" for k in goal) + " | | |")
    seeds = sorted({s for out in summary.values() for s in out["seeds"]})
    lines += ["", f"Mean ± std over seeds {seeds}; benchmark preset, {cfg.n_images} images at {cfg.image_size} px, "
              f"decoy on {cfg.decoy_probability:.0%} of the top-grade training images, {cfg.epochs} training epochs, "
              f"one recalibration of {cfg.recal_epochs} epochs (gamma {cfg.gamma}, lr {cfg.recal_lr}). "
              "Decoy mass: share of the map inside the decoy square on the test images with the decoy stamped "
              f"(a uniform map: {100 * decoy_region(cfg.image_size, cfg.decoy_size).float().mean():.2f}%)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Steps per seed and model: shortcut model (decoy on) -> register champion "
                                            "-> bentoml serve -> ROIs via POST /feedback -> medattn recalibrate "
                                            "--if-needed -> challenger; ceiling = same model without decoy.")
    defaults = ProofConfig()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data and training)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="attention models")
    parser.add_argument("--quick", action="store_true", help="1 seed, 240 images at 48 px, 4 epochs: a smoke run")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml", help="base parameters file")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "proof", help="report folder")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="PROOF_JSON",
                        help="no training: merge the cases of these proof.json files (same config, e.g. one run "
                             "per model in parallel) into one report under --out")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep datasets, registries, logs here; finished cases with the same sizes are reused "
                             "(default: a temporary folder, removed)")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                            help=f"(default {value}; --quick: {getattr(QUICK, name)})")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> ProofConfig:
    cfg = QUICK if args.quick else ProofConfig()
    overrides = {name: getattr(args, name) for name in asdict(cfg) if getattr(args, name) is not None}
    cfg = replace(cfg, **overrides)
    if cfg.roi_share > 0.10:
        raise SystemExit(f"--roi-share {cfg.roi_share} is over the issue's 10% of the training images")
    return cfg


def run_proof(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    cfg = config_from(args)
    seeds = args.seeds[:1] if args.quick else args.seeds
    base = load_params(args.params)
    out = Path(args.out)
    figures_dir = out / "figures"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="medattn-proof-"))
    os.environ.setdefault("MEDATTN_TRAIN_THREADS", "1")
    started = time.perf_counter()
    cases = []
    jobs = [(seed, model) for seed in seeds for model in args.models]
    for seed, model in tqdm(jobs, desc="proof (seed x model)", unit="case", file=sys.stderr):
        cases.append(run_case(base, cfg, seed, model, work, figures_dir))
    summary = summarise(cases)
    report = {"config": asdict(cfg), "seeds": seeds, "summary": summary, "cases": cases,
              "seconds": round(time.perf_counter() - started, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"MEDATTN_TRAIN_THREADS={os.environ.get('MEDATTN_TRAIN_THREADS')}",
              "command": " ".join(["python", "benchmarks/recalibration_proof.py", *sys.argv[1:]])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "proof.json").write_text(json.dumps(report, indent=2))
    (out / "proof.md").write_text(markdown_table(summary, cfg) + "\n" + per_seed_table(cases))
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return report


def merge_reports(paths: list[Path], out: Path) -> dict[str, Any]:
    """One report from several runs of the same config (their cases side by side, summarised anew)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    if any(r["config"] != reports[0]["config"] for r in reports):
        raise SystemExit("--merge: the reports were measured with different configs")
    cases = [c for r in reports for c in r["cases"]]
    if len({(c["seed"], c["model"]) for c in cases}) != len(cases):
        raise SystemExit("--merge: a (seed, model) case appears in more than one report")
    cfg = ProofConfig(**reports[0]["config"])
    summary = summarise(cases)
    report = {**reports[0], "seeds": sorted({c["seed"] for c in cases}), "summary": summary, "cases": cases,
              "seconds": round(sum(r["seconds"] for r in reports), 1),
              "command": " + ".join(r["command"] for r in reports) + " (merged; seconds summed)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "proof.json").write_text(json.dumps(report, indent=2))
    (out / "proof.md").write_text(markdown_table(summary, cfg) + "\n" + per_seed_table(cases))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    report = merge_reports(args.merge, Path(args.out)) if args.merge else run_proof(args)
    print((Path(args.out) / "proof.md").read_text())
    print(f"{report['seconds']:.0f} s on {report['machine']}; written to {args.out}")


if __name__ == "__main__":
    main()
