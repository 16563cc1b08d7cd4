"""Snapshot the feedback store into a DVC-trackable folder (``medattn feedback export``).

Layout of ``out_dir``::

    feedback.jsonl      one record per line, oldest first (created_at, then id), keys sorted
    images/<sha256>.<ext>  the original image bytes, extension from their format (.png, .jpg, ...)
    masks/<id>.png      the record's ROIs rasterised at image size: 255 = relevant,
                        0 = irrelevant, 128 = untouched (see ``schema.feedback_map``)
    manifest.json       format, counts and the ``since`` filter

Everything is a function of the records alone (no export time, no idempotency keys or retrain
bookkeeping), so exporting unchanged feedback twice gives byte-identical files and DVC sees
no change. The folder is built next to ``out_dir`` and swapped in at the end, so a crash
leaves the previous snapshot, never a half-written one.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from PIL import Image
from tqdm import tqdm

from medattn.atomic_files import atomic_dir, write_json_atomic
from medattn.errors import DataError, ParamError
from medattn.feedback.blobs import DEFAULT_BLOB_ROOT, BlobStore
from medattn.feedback.schema import FeedbackNotFound, feedback_map
from medattn.feedback.store import DEFAULT_FEEDBACK_DB_URL, FeedbackStore

EXPORT_FORMAT = "medattn-feedback-export/1"
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp"}


def image_extension(data: bytes) -> str:
    """File extension for image bytes: by PIL's format, ``.dcm`` for DICOM, else ``.bin``."""
    if data[128:132] == b"DICM":
        return ".dcm"
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _EXTENSIONS.get(image.format or "", ".bin")
    except Exception:  # unknown bytes are still exported, only without a telling extension
        return ".bin"


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _write_png(path: Path, array: Any) -> None:
    # No metadata and fixed compression: the same mask always gives the same bytes.
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def _build(store: FeedbackStore, blobs: BlobStore, folder: Path, since: Optional[datetime]) -> dict[str, Any]:
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    records = sorted(store.iter_feedback(since=since), key=lambda r: (r.created_at, str(r.id)))
    image_files: dict[str, str] = {}
    roi_kinds: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    with open(folder / "feedback.jsonl", "w", encoding="utf-8", newline="\n") as lines:
        for record in tqdm(records, desc="export feedback", unit="record", disable=None):
            if record.image_sha256 not in image_files:
                try:
                    data = blobs.get(record.image_sha256)
                except FeedbackNotFound:
                    raise DataError(f"feedback {record.id} refers to image {record.image_sha256}, "
                                    f"which is missing from blob store {blobs.root}") from None
                name = f"images/{record.image_sha256}{image_extension(data)}"
                (folder / name).write_bytes(data)
                image_files[record.image_sha256] = name
            mask_name = f"masks/{record.id}.png"
            _write_png(folder / mask_name, feedback_map(record.roi_models(), record.width, record.height))
            roi_kinds.update(roi["kind"] for roi in record.rois)
            versions[record.model_version] += 1
            lines.write(_json_line({**record.to_json(), "image": image_files[record.image_sha256],
                                    "mask": mask_name}) + "\n")
    return {
        "format": EXPORT_FORMAT,
        "since": since.astimezone(timezone.utc).isoformat() if since else None,
        "records": len(records),
        "images": len(image_files),
        "masks": len(records),
        "rois": dict(sorted(roi_kinds.items())),
        "records_per_model_version": dict(sorted(versions.items())),
        "mask_values": {"relevant": 255, "irrelevant": 0, "untouched": 128},
    }


def export_snapshot(store: FeedbackStore, blobs: BlobStore, out_dir: Path,
                    since: Optional[datetime] = None) -> Path:
    """Write the snapshot folder (replacing a previous export there); returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / "manifest.json").is_file())):
        raise DataError(f"{out_dir} exists and is not a feedback export; refusing to replace it")
    with atomic_dir(out_dir) as building:
        manifest = _build(store, blobs, building, since)
        write_json_atomic(building / "manifest.json", manifest, sort_keys=True)
    return out_dir


def _parse_since(since: Optional[str]) -> Optional[datetime]:
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise ParamError(f"--since {since!r} is not an ISO date or date-time (e.g. 2024-05-01T12:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def export_command(
    db_url: Annotated[str, typer.Option(envvar="MEDATTN_FEEDBACK_DB",
                                        help="Feedback database URL (sqlite:///... or postgresql+psycopg://...).")]
    = DEFAULT_FEEDBACK_DB_URL,
    blob_root: Annotated[Path, typer.Option(envvar="MEDATTN_BLOB_DIR", help="Image blob store folder.")]
    = DEFAULT_BLOB_ROOT,
    out: Annotated[Path, typer.Option(help="Snapshot folder to (re)write.")] = Path("data/feedback"),
    since: Annotated[Optional[str], typer.Option(help="Only feedback created at or after this ISO date-time "
                                                      "(UTC when no offset is given).")] = None,
) -> None:
    """Export expert feedback (records, images, ROI masks) into a DVC-trackable folder."""
    moment = _parse_since(since)
    with FeedbackStore(db_url) as store:
        folder = export_snapshot(store, BlobStore(blob_root), out, since=moment)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    typer.echo(f"exported {manifest['records']} feedback records and {manifest['images']} images to {folder}")
