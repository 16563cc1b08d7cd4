"""What the HTTP routes do, without HTTP: authorise, predict, store feedback, switch models.

The routes (the FastAPI routers under ``serving/``) only parse requests and format answers;
everything with a rule in it is here, free of BentoML and of HTTP frameworks, so it is importable
and testable as library code. The model itself lives in the model-runner service (adaptive batching), which
this code reaches through a :class:`ModelClient` - in production a BentoML dependency proxy.

Errors are raised as :class:`~medattn.errors.MedattnError` subclasses that carry their HTTP status
(``ImageRejected``, ``AuthError``, the feedback errors, :class:`HttpProblem`), so the error
handler maps each one to a 4xx/503 JSON body without a lookup table of messages.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
from anyio import to_thread

from medattn.errors import MedattnError, RegistryError
from medattn.feedback.blobs import BlobStore
from medattn.feedback.retention import UploadRetention
from medattn.feedback.scheduler import rules_from_params
from medattn.feedback.schema import FeedbackSubmission, InvalidFeedback, canonical_model_version
from medattn.feedback.store import FeedbackRecord, FeedbackStore
from medattn.registry.location import find_repo_root
from medattn.serving import metrics
from medattn.serving.auth import AuthError, Principal, Role
from medattn.serving.champion_signal import ChampionSignal
from medattn.serving.imaging import DecodedImage, ImageRejected, decode_image
from medattn.serving.inference import Predictor, RawPrediction, build_payload
from medattn.serving.prediction_log import PredictionWriter
from medattn.serving.settings import ServingSettings
from medattn.serving.upload_storage import stored_upload

log = logging.getLogger("medattn.serving")


class HttpProblem(MedattnError):
    """A failure that carries its own HTTP status (no model loaded, a refused reload, bad framing)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class ModelClient(Protocol):
    """The model-runner service as the API service sees it (async calls).

    Transport failures surface as :class:`HttpProblem` (503); ``infer`` returns one dict per
    image, ``{"error": ...}`` when the runner has no model.
    """

    async def infer(self, images: list[np.ndarray]) -> list[dict[str, Any]]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def status(self) -> dict[str, Any]: ...


@runtime_checkable
class LocalModel(Protocol):
    """A :class:`ModelClient` that may hold the model in this process (``medattn.serving.placement``)."""

    def local_predictor(self) -> Optional[Predictor]:
        """The predictor to call directly now, or None (then ``infer`` decides where it runs)."""


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its bytes, declared content type and where it came from (for messages)."""

    data: bytes
    content_type: str
    field: str = "image"


def http_status_of(exc: BaseException) -> Optional[int]:
    """The HTTP status an expected error maps to; None for a bug (answered 500)."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, RegistryError):
        return 409  # no challenger, no previous champion, unknown alias: the registry's state refuses
    if isinstance(exc, MedattnError):
        return 400
    return None


class ServingBackend:
    """State shared by the routes of one API worker: auth, feedback store, blobs, the runner."""

    def __init__(self, settings: ServingSettings, runner: ModelClient) -> None:
        self.settings = settings
        self.runner = runner
        self.auth = settings.authenticator()
        self.store = FeedbackStore(settings.feedback_db)
        self.writer = PredictionWriter(self.store)
        self.blobs = BlobStore(settings.blob_dir)
        self.retention = UploadRetention(self.store, self.blobs, settings.upload_retention_hours,
                                         settings.retention_sweep_seconds)
        self.metrics = metrics.get_metrics()
        self._registered_versions: set[str] = set()
        # the champion-changed signal of all API workers (medattn.serving.champion_signal)
        self.champion_signal = ChampionSignal(settings.state_dir)
        self._followed_stamp = self.champion_signal.stamp()
        self._follow_lock = asyncio.Lock()
        self.metrics.set_feedback_waiting(self.store.count_pending())
        # the rules the scheduler will apply (params.yaml), shown before its first check records its own
        self.recalibration_rules = rules_from_params(find_repo_root())

    def close(self) -> None:
        self.writer.close()  # commits what is queued first
        self.store.close()

    # -- auth ----------------------------------------------------------------------------------

    def authorize(self, authorization: Optional[str], role: Role) -> Principal:
        return self.auth.check(authorization, role)

    # -- predictions ---------------------------------------------------------------------------

    async def predict(self, uploads: Sequence[Upload], raw_attention: bool = False) -> list[dict[str, Any]]:
        """Decode, run one batch through the model, remember each prediction, build the bodies.

        The answer waits until every prediction of the request is committed to the store (group
        commit, :mod:`medattn.serving.prediction_log`): a ``request_id`` a client receives can
        always be cited by feedback.
        """
        await self.follow_champion_signal()
        local = self.runner.local_predictor() if isinstance(self.runner, LocalModel) else None
        if local is not None:
            # The model is in this process: decode, model and answer in ONE trip to the thread
            # pool instead of three (each trip is a hand-over between the event loop and a thread).
            prepared = await to_thread.run_sync(self._predict_here, local, uploads, raw_attention)
        else:
            decoded = [await to_thread.run_sync(self._decode, upload, i, len(uploads))
                       for i, upload in enumerate(uploads)]
            outputs = await self._infer([np.asarray(image.image) for image in decoded])
            prepared = []
            for upload, image, output in zip(uploads, decoded, outputs, strict=True):
                raw = RawPrediction.from_wire(output)
                prepared.append((raw, *await to_thread.run_sync(self._prepare, uuid.uuid4().hex, upload, image,
                                                                raw, raw_attention)))
        await asyncio.gather(*(self.writer.record(row) for _, _, row, _ in prepared))
        payloads = []
        for raw, stored, row, payload in prepared:
            if not self.blobs.exists(row["image_sha256"]):
                # A retention sweep deleted these bytes (an older, uncited prediction of the same
                # image) between the blob write and the commit: store them again.
                await to_thread.run_sync(self.blobs.put, stored)
            self.metrics.record_prediction(label=raw.label, model_version=raw.model.version,
                                           confidence=raw.confidence, attention=raw.attention)
            self.metrics.set_serving_model(raw.model.name, raw.model.version)
            payloads.append(payload)
        self.retention.sweep_in_background()
        return payloads

    async def follow_champion_signal(self) -> None:
        """Reload this worker's model first if another worker moved the champion since we looked.

        One ``stat`` per request. Requests that arrive while the reload runs wait for it, so none
        of them is answered by the old champion; a failed reload is logged and not retried per
        request (the poll tries again), and the old model keeps serving.
        """
        follow = getattr(self.runner, "follow_champion", None)
        if follow is None:
            return  # the runner (one process) serves: the worker that moved the alias reloaded it
        stamp = self.champion_signal.stamp()
        if stamp == self._followed_stamp:
            return
        async with self._follow_lock:
            stamp = self.champion_signal.stamp()
            if stamp == self._followed_stamp:
                return  # another request of this worker has just followed it
            try:
                await to_thread.run_sync(follow)
            except Exception as exc:  # noqa: BLE001 - logged; the old model keeps serving
                log.warning("champion signal: reload failed, still serving the previous model: %s", exc)
            self._followed_stamp = stamp

    def _predict_here(self, predictor: Predictor, uploads: Sequence[Upload],
                      raw_attention: bool) -> list[tuple[RawPrediction, bytes, dict[str, Any], dict[str, Any]]]:
        """Decode, one forward pass, then blob + row + body per image: all in the calling thread."""
        decoded = [self._decode(upload, i, len(uploads)) for i, upload in enumerate(uploads)]
        raws = predictor.predict([image.image for image in decoded])
        return [(raw, *self._prepare(uuid.uuid4().hex, upload, image, raw, raw_attention))
                for upload, image, raw in zip(uploads, decoded, raws, strict=True)]

    def _decode(self, upload: Upload, index: int, count: int) -> DecodedImage:
        try:
            return decode_image(upload.data, upload.content_type, self.settings.image_limits)
        except ImageRejected as exc:
            if count == 1:
                raise
            raise ImageRejected(exc.status_code, f"{upload.field}[{index}]: {exc}") from None

    async def _infer(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        outputs = await self.runner.infer(images)
        failed = next((o["error"] for o in outputs if "error" in o), None)
        if failed is not None:
            raise HttpProblem(503, f"no model loaded: {failed}")
        return outputs

    def _prepare(self, request_id: str, upload: Upload, image: DecodedImage, raw: RawPrediction,
                 raw_attention: bool) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """(stored image bytes, prediction row, response body): one trip to the thread pool.

        The image blob is written (durably) here, before its row is queued for the commit:
        a committed row never cites a missing image.
        """
        stored = self._stored(upload.data, image)
        row = dict(request_id=request_id, image_sha256=self.blobs.put(stored), width=image.width,
                   height=image.height, model_name=raw.model.name, model_version=raw.model.version,
                   label=raw.label,
                   probabilities={n: float(p) for n, p in zip(raw.class_names, raw.probabilities, strict=True)})
        return stored, row, build_payload(raw, image.width, image.height, request_id, raw_attention)

    def _stored(self, data: bytes, image: DecodedImage) -> bytes:
        return stored_upload(data, image, self.settings.stored_upload, self.settings.strip_metadata)

    # -- feedback ------------------------------------------------------------------------------

    def submit_feedback(self, principal: Principal, submission: FeedbackSubmission,
                        image: Optional[Upload], idempotency_key: Optional[str]) -> tuple[FeedbackRecord, bool]:
        """Store one submission durably; returns (record, created). Blocking: call in a thread."""
        if principal.role != "admin" and submission.expert_id != principal.name:
            raise AuthError(403, f"expert_id {submission.expert_id!r} is not the token's owner "
                                 f"{principal.name!r} (only admin tokens may submit for others)")
        if submission.model_name != self.settings.model_name:
            raise InvalidFeedback(f"model_name {submission.model_name!r} is not served here "
                                  f"(this service serves {self.settings.model_name!r})")
        sha256 = width = height = None
        if image is not None:
            decoded = decode_image(image.data, image.content_type, self.settings.image_limits)
            # The image is committed before the record that cites it: a crash in between leaves
            # an orphan blob (harmless, content-addressed), never a record without its image.
            sha256, width, height = self.blobs.put(self._stored(image.data, decoded)), decoded.width, decoded.height
        elif submission.request_id is None:
            raise InvalidFeedback("feedback needs either a request_id or the image itself")
        if submission.request_id is None:
            self.check_model_version(submission.model_version)
        record, created = self.store.add_feedback(submission, sha256, width, height, idempotency_key,
                                                  caller=principal.name)
        if created:
            kinds = [roi.kind for roi in submission.rois]
            self.metrics.record_feedback(relevant_rois=kinds.count("relevant"),
                                         irrelevant_rois=kinds.count("irrelevant"),
                                         label_corrected=submission.corrected_label is not None)
        self.metrics.set_feedback_waiting(self.store.count_pending())
        return record, created

    def list_feedback(self, since: Optional[datetime], model_version: Optional[str],
                      limit: int, offset: int) -> list[FeedbackRecord]:
        if model_version is not None:
            model_version = self.check_model_version(model_version)
        return self.store.list_feedback(since=since, model_version=model_version, limit=limit, offset=offset)

    def check_model_version(self, version: str) -> str:
        """MLflow's string for ``version`` ("0002" -> "2"); 422 unless the served model has that version."""
        from medattn.registry import get_model_version_info

        version = canonical_model_version(version)
        if version in self._registered_versions:
            return version
        try:
            get_model_version_info(self.settings.model_name, version, tracking_uri=self.settings.tracking_uri)
        except RegistryError as exc:
            raise InvalidFeedback(f"unknown model version {version!r} of {self.settings.model_name!r}: {exc}") from None
        self._registered_versions.add(version)
        return version

    # -- model lifecycle (admin) ---------------------------------------------------------------

    async def model_status(self) -> dict[str, Any]:
        await self.follow_champion_signal()  # /model shows what the next prediction will use
        status = await self.runner.status()
        model = status.get("model")
        if model:
            self.metrics.set_serving_model(model["name"], model["version"])
        else:
            self.metrics.clear_serving_model()
        return status

    async def reload(self) -> dict[str, Any]:
        """Make the runner load the current champion now (no-op when it already serves it)."""
        result = await self.runner.reload()
        if "error" in result:
            raise HttpProblem(409, f"reload failed, still serving the previous model: {result['error']}")
        # the other API workers reload before their next prediction; this one already has
        stamp = self.champion_signal.send("reload")
        if stamp is not None:
            self._followed_stamp = stamp
        await self.model_status()
        return result

    async def promote(self, actor: str) -> dict[str, Any]:
        """Accept the challenger (audited as ``actor``, the admin token's name), then serve it."""
        from medattn.registry import promote_challenger

        return await self._move_champion(promote_challenger, actor)

    async def rollback(self, actor: str) -> dict[str, Any]:
        """Champion back to the previous version (audited as ``actor``), then serve it."""
        from medattn.registry import rollback_champion

        return await self._move_champion(rollback_champion, actor)

    async def _move_champion(self, move, actor: str) -> dict[str, Any]:
        from medattn.feedback.audit import alias_change_recorder

        def run():
            # the audit row is written inside the registry's alias lock; see medattn.registry.aliases
            on_change = alias_change_recorder(self.store, actor, self.settings.tracking_uri)
            return move(self.settings.model_name, tracking_uri=self.settings.tracking_uri, on_change=on_change)

        info = await to_thread.run_sync(run)
        return {"champion": info.to_dict(), "reload": await self.reload()}
