"""The recalibration job (seed 002): champion + experts' ROIs -> feedback loss -> challenger -> gate.

``recalibrate(params, snapshot_dir, dataset_dir, store, ...)``, what ``medattn recalibrate`` and the
DVC stage ``recalibrate`` run:

1. read the exported feedback snapshot (``medattn feedback export``): records, images, masks;
   an empty or corrupt snapshot, an image of another size than the model's input, or a record
   the store does not know stops the job with one line before anything is trained;
2. download the ``champion`` and fine-tune it through the one ``fit`` (``init_from`` = the champion's
   bundle, thawed so a frozen global map can move, ``extra_loss`` = :class:`FeedbackLoss`) on the
   champion's own train / validation split read from the prepared dataset's manifest — never
   re-drawn; a corrected label replaces the image's training label;
3. measure champion and challenger alike: test macro-F1, and agreement with the experts' ROIs on
   the held-out feedback records (share of the map inside relevant and inside irrelevant regions);
4. gate: **eligible** iff macro-F1 >= champion's - ``recalibrate.tolerance`` *and* agreement
   (relevant - irrelevant share) is higher; promoted only when ``recalibrate.auto_promote``;
5. register the challenger (tags: parent version, snapshot DVC hash, feedback ids, figures),
   alias it ``challenger``, mark the pending feedback consumed, append an audit event.

Everything that changes shared state comes last and in this order (register, alias, consume,
audit), so a job that fails or is killed before step 5 leaves the champion, the aliases and the
feedback store as they were; its MLflow run reads FAILED (or stays RUNNING when SIGKILLed).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from PIL import Image

from medattn.config import Params
from medattn.data.dataset import load_split
from medattn.data.manifest import read_manifest
from medattn.data.preprocess import normalize_tensor, pil_to_uint8_tensor, to_rgb
from medattn.errors import DataError, first_line
from medattn.feedback.audit import RECALIBRATION, alias_change_recorder, mirror_to_mlflow, record_event
from medattn.feedback.export import EXPORT_FORMAT
from medattn.feedback.schema import FeedbackNotFound
from medattn.feedback.store import FeedbackStore
from medattn.models.bundle import load_bundle, save_bundle
from medattn.training.feedback_loss import (
    NO_LABEL,
    FeedbackLoss,
    FeedbackTargets,
    explanation_maps,
    mechanism_for,
    region_shares,
    thawed_state,
)
from medattn.training.fit import LabelledImages, evaluate_split, fit

SPLIT_FINGERPRINT_TAG = "split_fingerprint"
MAX_FEEDBACK_ID_TAG_CHARS = 7000  # MLflow keeps 8000 characters of a tag value


@dataclass(frozen=True)
class SnapshotRecord:
    id: str
    image_path: Path
    mask_path: Path
    image_sha256: str
    corrected_label: Optional[str]


@dataclass(frozen=True)
class Figures:
    """What the gate compares: test macro-F1 / accuracy and ROI agreement on held-out feedback."""

    test_macro_f1: float
    test_accuracy: float
    roi_relevant_share: Optional[float]
    roi_irrelevant_share: Optional[float]

    @property
    def roi_agreement(self) -> Optional[float]:
        if self.roi_relevant_share is None or self.roi_irrelevant_share is None:
            return None
        return self.roi_relevant_share - self.roi_irrelevant_share


@dataclass(frozen=True)
class RecalibrationResult:
    model_name: str
    parent_version: str
    version: str
    eligible: bool
    promoted: bool
    reason: str
    run_id: str
    mechanism: str
    feedback_ids: list[str]
    consumed: int
    held_out_ids: list[str]
    champion: Figures
    challenger: Figures
    snapshot_dvc_hash: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["champion"]["roi_agreement"] = self.champion.roi_agreement
        out["challenger"]["roi_agreement"] = self.challenger.roi_agreement
        return out


# -- the snapshot -----------------------------------------------------------------------------


def read_snapshot(snapshot_dir: Path) -> list[SnapshotRecord]:
    """The records of an export folder; an empty, partial or corrupt one is a DataError."""
    snapshot_dir = Path(snapshot_dir)
    manifest_path = snapshot_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{snapshot_dir}: not a feedback snapshot (no manifest.json; run `medattn feedback export`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{manifest_path}: corrupt (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise DataError(f"{manifest_path}: format is not {EXPORT_FORMAT!r}")
    lines_path = snapshot_dir / "feedback.jsonl"
    if not lines_path.is_file():
        raise DataError(f"{snapshot_dir}: corrupt snapshot (feedback.jsonl missing)")
    records: list[SnapshotRecord] = []
    for number, line in enumerate(lines_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            record = SnapshotRecord(id=str(raw["id"]), image_path=snapshot_dir / raw["image"],
                                    mask_path=snapshot_dir / raw["mask"], image_sha256=str(raw["image_sha256"]),
                                    corrected_label=raw.get("corrected_label"))
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{lines_path}:{number}: corrupt record (expected the export's JSON keys)") from None
        for path in (record.image_path, record.mask_path):
            if not path.is_file():
                raise DataError(f"{lines_path}:{number}: feedback {record.id}: {path.name} missing from the snapshot")
        records.append(record)
    if not records:
        raise DataError(f"{snapshot_dir}: the feedback snapshot is empty (no records to recalibrate with)")
    if manifest.get("records") not in (None, len(records)):
        raise DataError(f"{manifest_path}: says {manifest.get('records')} records, feedback.jsonl has {len(records)}")
    return records


def snapshot_dvc_hash(snapshot_dir: Path) -> Optional[str]:
    """The snapshot's hash as DVC recorded it (``<dir>.dvc`` or the stage's dvc.lock), if any."""
    dvc_file = Path(f"{snapshot_dir}.dvc")
    if dvc_file.is_file():
        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
            return str(outs[0].get("md5")) if outs and outs[0].get("md5") else None
        except (yaml.YAMLError, AttributeError, IndexError):
            return None
    return None


def snapshot_content_hash(snapshot_dir: Path) -> str:
    """SHA-256 over the snapshot's files (names and bytes): identifies it with or without DVC."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(snapshot_dir).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(snapshot_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _decode(path: Path, record_id: str, mode: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            image.load()
            return image.convert(mode) if mode == "L" else to_rgb(image)
    except Exception as exc:
        raise DataError(f"feedback {record_id}: cannot decode {path.name} ({first_line(exc)})") from exc


def feedback_targets(records: list[SnapshotRecord], class_names: list[str], image_size: int,
                     mean: tuple[float, ...], std: tuple[float, ...]) -> FeedbackTargets:
    """Decode images and masks at the model's input size (another size is a DataError)."""
    images, masks, labels = [], [], []
    for record in records:
        image = _decode(record.image_path, record.id, "RGB")
        mask = _decode(record.mask_path, record.id, "L")
        if image.size != (image_size, image_size):
            raise DataError(f"feedback {record.id}: image is {image.size[0]}x{image.size[1]} px, the model takes "
                            f"{image_size}x{image_size} px (give feedback on images of the model's input size)")
        if mask.size != image.size:
            raise DataError(f"feedback {record.id}: mask is {mask.size[0]}x{mask.size[1]}, its image "
                            f"{image.size[0]}x{image.size[1]}")
        if record.corrected_label is not None and record.corrected_label not in class_names:
            raise DataError(f"feedback {record.id}: corrected label {record.corrected_label!r} is not a class "
                            f"of the model ({', '.join(class_names)})")
        images.append(pil_to_uint8_tensor(image))
        masks.append(torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())[None])
        labels.append(class_names.index(record.corrected_label) if record.corrected_label else NO_LABEL)
    stacked = torch.stack(images)
    return FeedbackTargets([r.id for r in records], normalize_tensor(stacked, mean, std), torch.stack(masks),
                           torch.tensor(labels, dtype=torch.long))


def held_out(records: list[SnapshotRecord], fraction: float) -> set[str]:
    """Ids kept out of training to measure ROI agreement on: a fixed function of the ids."""
    if len(records) < 2 or fraction <= 0:
        return set()
    count = max(1, min(len(records) - 1, round(fraction * len(records))))
    ranked = sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    return {r.id for r in ranked[:count]}


# -- the data of the champion's split ----------------------------------------------------------


def split_fingerprint(dataset_dir: Path) -> str:
    """Hash of (id, image sha256, split) rows: equal means the same train / val / test split."""
    frame = read_manifest(dataset_dir)
    rows = frame[["id", "sha256", "split"]].astype(str).values.tolist()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _labelled(dataset_dir: Path, split: str, mean, std) -> tuple[LabelledImages, list[str], list[str]]:
    tensors = load_split(dataset_dir, split, with_masks=False)
    sha = read_manifest(dataset_dir).set_index("id").loc[tensors.ids, "sha256"].astype(str).tolist()
    return LabelledImages(normalize_tensor(tensors.images, mean, std), tensors.labels), tensors.class_names, sha


def _with_corrected_labels(train: LabelledImages, position: dict[str, int], records: list[SnapshotRecord],
                           class_names: list[str]) -> tuple[LabelledImages, int]:
    """A corrected label in the feedback replaces the training label of that image (``position``: sha -> row)."""
    labels = train.labels.clone()
    changed = 0
    for record in records:
        i = position.get(record.image_sha256)
        if record.corrected_label is not None and i is not None:
            new = class_names.index(record.corrected_label)
            changed += int(labels[i] != new)
            labels[i] = new
    return LabelledImages(train.images, labels), changed


# -- measuring ---------------------------------------------------------------------------------


def measure(model, test: LabelledImages, held: Optional[FeedbackTargets], batch_size: int, mechanism: str) -> Figures:
    device = next(model.parameters()).device
    scores = evaluate_split(model, test, batch_size, device)
    relevant = irrelevant = None
    if held is not None and len(held):
        model.eval()
        maps = explanation_maps(model, held.images.to(device), mechanism).cpu()
        rel, irr = region_shares(maps, held.masks)
        relevant, irrelevant = float(rel.mean()), float(irr.mean())
    return Figures(scores["macro_f1"], scores["acc"], relevant, irrelevant)


def gate(champion: Figures, challenger: Figures, tolerance: float) -> tuple[bool, str]:
    """(eligible?, why): non-inferior test macro-F1 within ``tolerance`` AND better ROI agreement."""
    floor = champion.test_macro_f1 - tolerance
    if challenger.test_macro_f1 < floor:
        return False, (f"test macro-F1 {challenger.test_macro_f1:.4f} < champion's {champion.test_macro_f1:.4f} "
                       f"- tolerance {tolerance}: not eligible")
    if challenger.roi_agreement is None or champion.roi_agreement is None:
        return False, "no held-out feedback to measure agreement with the experts' ROIs on: not eligible"
    if challenger.roi_agreement <= champion.roi_agreement:
        return False, (f"ROI agreement {challenger.roi_agreement:.4f} <= champion's {champion.roi_agreement:.4f}: "
                       "not eligible")
    return True, (f"eligible: test macro-F1 {challenger.test_macro_f1:.4f} >= {floor:.4f} and ROI agreement "
                  f"{challenger.roi_agreement:.4f} > champion's {champion.roi_agreement:.4f}")


# -- the job -----------------------------------------------------------------------------------


def recalibrate(params: Params, snapshot_dir: Path, dataset_dir: Path, store: FeedbackStore, *,
                actor: str = "recalibration", out_path: Optional[Path] = None,
                on_epoch: Optional[Callable[[dict[str, float]], None]] = None,
                progress: bool = True) -> RecalibrationResult:
    """Run the whole job (see the module docstring); returns what it did."""
    from medattn.registry import resolve_tracking_uri

    records = read_snapshot(snapshot_dir)
    pending: list[str] = []
    for record in records:
        try:
            if store.get(record.id).consumed_by_retrain is None:
                pending.append(record.id)
        except FeedbackNotFound:
            raise DataError(f"snapshot {snapshot_dir}: feedback {record.id} is not in the feedback store "
                            f"{store.safe_url} (a snapshot of another store?)") from None
    uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    work = Path(tempfile.mkdtemp(prefix="medattn-recalibrate-"))
    try:
        return _run(params, snapshot_dir, dataset_dir, store, records, pending, uri, work, actor, out_path,
                    on_epoch, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(params: Params, snapshot_dir: Path, dataset_dir: Path, store: FeedbackStore, records: list[SnapshotRecord],
         pending: list[str], uri: str, work: Path, actor: str, out_path: Optional[Path],
         on_epoch: Optional[Callable[[dict[str, float]], None]], progress: bool) -> RecalibrationResult:
    from medattn.registry import (
        CHALLENGER,
        download_model_version,
        get_model_version_info,
        log_artifacts,
        log_epoch_metrics,
        log_metrics,
        pipeline_run,
        promote_challenger,
    )
    from medattn.registry._mlflow import client_for
    from medattn.registry.registering import BUNDLE_HASH_TAG, bundle_hash, log_bundle_model

    rp = params.recalibrate
    model_name = params.mlflow.model_name
    champion_dir, champion_info = download_model_version(model_name, "champion", work / "champion", tracking_uri=uri)
    champion, spec = load_bundle(champion_dir)
    client = client_for(uri)
    champion_split = client.get_model_version(model_name, champion_info.version).tags.get(SPLIT_FINGERPRINT_TAG)
    fingerprint = split_fingerprint(dataset_dir)
    if champion_split is not None and champion_split != fingerprint:
        raise DataError(f"{dataset_dir}: its train/val/test split differs from champion version "
                        f"{champion_info.version}'s; a retrain must not re-draw splits")
    targets = feedback_targets(records, list(spec.class_names), spec.image_size, spec.mean, spec.std)
    held = held_out(records, rp.holdout_fraction)
    train_index = [i for i, r in enumerate(records) if r.id not in held]
    held_index = [i for i, r in enumerate(records) if r.id in held]
    train, class_names, train_sha = _labelled(dataset_dir, "train", spec.mean, spec.std)
    if class_names != list(spec.class_names):
        raise DataError(f"{dataset_dir}: classes {class_names} differ from the champion's {list(spec.class_names)}")
    val, _, _ = _labelled(dataset_dir, "val", spec.mean, spec.std)
    test, _, _ = _labelled(dataset_dir, "test", spec.mean, spec.std)
    position = {sha: i for i, sha in enumerate(train_sha)}  # the training row of each image
    train, relabelled = _with_corrected_labels(train, position, [records[i] for i in train_index], class_names)
    # images the training split holds get their plain CE there already (the feedback loss adds it
    # for the others only); all of them keep their label for the counterfactual CE
    fb = targets.subset(train_index)
    shas = [records[i].image_sha256 for i in train_index]
    known = [int(train.labels[position[sha]]) if sha in position else label  # corrections already applied
             for sha, label in zip(shas, fb.labels.tolist(), strict=True)]
    fb = replace(fb, labels=torch.tensor(known, dtype=torch.long),
                 in_training=torch.tensor([sha in position for sha in shas], dtype=torch.bool))
    mechanism = mechanism_for(champion)

    # the champion thawed (seed 001's frozen M may move again), saved as the bundle fit starts from
    thawed = work / "thawed"
    champion.load_state_dict(thawed_state(champion.state_dict()))
    save_bundle(champion, spec, thawed)
    champion, _ = load_bundle(champion_dir)
    model_params = replace(params.model, backbone=spec.backbone, attention=spec.attention, K=spec.K,
                           pixel_rank=spec.pixel_rank)
    train_params = replace(params.train, epochs=rp.epochs, cutoff_epoch=rp.epochs, lr=rp.lr)
    loss = FeedbackLoss(fb, gamma=rp.gamma, distance=rp.distance, mechanism=mechanism,
                        batch_size=rp.feedback_batch_size, counterfactual=rp.counterfactual,
                        seed=params.train.seed)
    tags = {"stage": "recalibrate", "parent_version": champion_info.version,
            "snapshot_dvc_hash": snapshot_dvc_hash(snapshot_dir) or "none",
            "snapshot_sha256": snapshot_content_hash(snapshot_dir),
            "feedback_ids": _ids_tag(targets.ids), "feedback_mechanism": mechanism, "actor": actor}
    run_params = {**params.flat(), "recalibrate.parent_version": champion_info.version}
    with pipeline_run(run_params, params.mlflow.experiment, uri, run_name=f"recalibrate-v{champion_info.version}",
                      tags=tags) as run_id:
        def epoch_done(row: dict[str, float]) -> None:
            log_epoch_metrics(run_id, [row], uri)
            print(f"recalibrate: epoch {int(row['epoch'])}/{rp.epochs} val macro-F1 {row['val_macro_f1']:.3f}",
                  file=sys.stderr, flush=True)
            if on_epoch is not None:
                on_epoch(row)

        result = fit(model_params, train_params, train, val, class_names=class_names, init_from=thawed,
                     extra_loss=loss, on_epoch=epoch_done, progress=progress)
        held_targets = targets.subset(held_index) if held_index else None
        before = measure(champion, test, held_targets, params.train.batch_size, mechanism)
        after = measure(result.model, test, held_targets, params.train.batch_size, mechanism)
        eligible, reason = gate(before, after, rp.tolerance)
        figures = {**{f"champion_{k}": v for k, v in _numbers(before).items()},
                   **{f"challenger_{k}": v for k, v in _numbers(after).items()},
                   "test_macro_f1": after.test_macro_f1, "eligible": float(eligible),
                   "relabelled_training_images": float(relabelled)}
        log_metrics(run_id, figures, uri)

        # -- from here on shared state changes: register, alias, consume, audit ------------------
        bundle = save_bundle(result.model, result.spec, work / "challenger")
        version_tags = {**tags, BUNDLE_HASH_TAG: bundle_hash(bundle), SPLIT_FINGERPRINT_TAG: fingerprint,
                        "eligible": str(eligible).lower(), "gate_reason": reason,
                        **{k: repr(v) for k, v in _numbers(after).items()}}
        version = log_bundle_model(run_id, bundle, model_name, tracking_uri=uri, metric=after.test_macro_f1,
                                   data_source=params.data.source, tags=version_tags)
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        promoted = False
        if eligible and rp.auto_promote:  # audited inside the alias lock (medattn.registry.aliases)
            promote_challenger(model_name, tracking_uri=uri, on_change=alias_change_recorder(store, actor, uri))
            promoted = True
        consumed = store.mark_consumed(pending, f"recalibration:{model_name}:v{version}") if pending else 0
        event = record_event(store, actor, RECALIBRATION, champion_info.version, version,
                             {"run_id": run_id, "eligible": eligible, "reason": reason, "feedback_ids": targets.ids,
                              "consumed": consumed, "mechanism": mechanism}, model_name=model_name)
        mirror_to_mlflow(event, uri, run_id)
        outcome = RecalibrationResult(
            model_name=model_name, parent_version=champion_info.version, version=version, eligible=eligible,
            promoted=promoted, reason=reason, run_id=run_id, mechanism=mechanism, feedback_ids=targets.ids,
            consumed=consumed, held_out_ids=sorted(held), champion=before, challenger=after,
            snapshot_dvc_hash=tags["snapshot_dvc_hash"] if tags["snapshot_dvc_hash"] != "none" else None)
        if out_path is not None:
            from medattn.atomic_files import write_json_atomic

            write_json_atomic(out_path, outcome.to_dict())
            log_artifacts(run_id, [out_path], uri, artifact_dir="recalibrate")
    get_model_version_info(model_name, version, tracking_uri=uri)  # the version reads back
    return outcome


def _ids_tag(ids: list[str]) -> str:
    text = ",".join(ids)
    return text if len(text) <= MAX_FEEDBACK_ID_TAG_CHARS else text[:MAX_FEEDBACK_ID_TAG_CHARS] + ",...[truncated]"


def _numbers(figures: Figures) -> dict[str, float]:
    values = {**asdict(figures), "roi_agreement": figures.roi_agreement}
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


__all__ = ["Figures", "RecalibrationResult", "feedback_targets", "gate", "held_out", "read_snapshot",
           "recalibrate", "snapshot_content_hash", "snapshot_dvc_hash", "split_fingerprint"]
