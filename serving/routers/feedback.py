"""Expert feedback: store one (``POST /feedback``), list them, read one."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from anyio import to_thread
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from medattn.errors import MedattnError, first_line
from medattn.feedback.schema import InvalidFeedback, parse_submission
from medattn.feedback.store import MAX_PAGE
from medattn.serving.imaging import ImageRejected
from serving import openapi_docs as docs
from serving.request_body import file_field, media_type, read_body, read_form
from serving.routers.context import AuthHeader, backend

router = APIRouter(tags=["feedback"])


@router.post("/feedback", status_code=201, summary="Store an expert's feedback (durably)",
             openapi_extra=docs.FEEDBACK_BODY,
             responses=docs.responses(201, docs.FEEDBACK_RECEIPT, 200, docs.FEEDBACK_RECEIPT,
                                      401, 403, 404, 409, 413, 415, 422, 503),
             description="ROIs are in the frame of the prediction's `image` (its `width` x `height`): "
                         "the upload as displayed (EXIF orientation applied) and reduced by an integer "
                         "factor when it had more than MEDATTN_MAX_FRAME_PIXELS pixels; origin top-left, "
                         "x right, y down. Brush masks must have exactly that size; their sizes are "
                         "checked from the RLE header or PNG IHDR before decoding, and all brush masks "
                         "of one submission may declare at most MEDATTN_MAX_FEEDBACK_MASK_PIXELS pixels "
                         "(413 past it).")
async def post_feedback(request: Request, authorization: Optional[str] = AuthHeader,
                        idempotency_key: Optional[str] = Header(None, max_length=200,
                                                                description="retries with the same key are safe"),
                        ) -> JSONResponse:
    """JSON body citing a prediction's ``request_id``, or multipart: ``feedback`` (JSON) + ``image``.

    201 only once the record (and its image) are committed; 200 when the Idempotency-Key was
    already used with this body (the first record is returned, nothing new is stored).
    """
    svc = backend()
    principal = svc.authorize(authorization, "expert")
    body = await read_body(request, svc.settings.max_upload_bytes)
    media = media_type(request)
    image = None
    if media == "application/json":
        submission = parse_submission(body, svc.settings.max_feedback_mask_pixels)
    elif media == "multipart/form-data":
        form = await read_form(request, body, svc.settings.max_upload_bytes, max_files=1)
        raw = form.get("feedback")
        if raw is None:
            raise InvalidFeedback("multipart body has no 'feedback' field (the submission as JSON)")
        submission = parse_submission(await raw.read() if isinstance(raw, UploadFile) else raw,
                                      svc.settings.max_feedback_mask_pixels)
        image = await file_field(form, "image", required=False)
    else:
        raise ImageRejected(415, f"content type {media or 'none'!r}: send application/json, or "
                                 "multipart/form-data with 'feedback' and 'image'")
    record, created = await to_thread.run_sync(svc.submit_feedback, principal, submission, image, idempotency_key)
    await to_thread.run_sync(_audit, svc, principal.name, record)
    receipt = {"id": str(record.id), "created_at": record.created_at.isoformat(),
               "request_id": record.request_id, "image_sha256": record.image_sha256, "replayed": not created}
    return JSONResponse(receipt, status_code=201 if created else 200, headers={"Location": f"/feedback/{record.id}"})


def _audit(svc, actor: str, record) -> None:
    """The record's audit row, after its commit (a replayed submission finds its row, or writes it now).

    The feedback is committed first: the expert's work is never lost to an audit failure. Should
    the row then fail, the answer is a 503 that says so, and a retry with the same Idempotency-Key
    (which stores nothing new) writes the missing row.
    """
    from medattn.feedback.audit import record_feedback_event
    from medattn.serving.backend import HttpProblem

    try:
        record_feedback_event(svc.store, actor, record)
    except MedattnError as exc:
        raise HttpProblem(503, f"feedback {record.id} is stored, but its audit row could not be written "
                               f"({first_line(exc)}); retry with the same Idempotency-Key to complete it") from None


@router.get("/feedback", summary="List feedback, oldest first",
            responses=docs.responses(200, docs.FEEDBACK_LIST, 401, 403, 422))
async def list_feedback(
    since: Optional[datetime] = Query(None, description="ISO 8601; records created at or after it (UTC if no zone)"),
    model_version: Optional[str] = Query(None, max_length=200, description="only feedback on this model version"),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
    offset: int = Query(0, ge=0, le=10**9),
    authorization: Optional[str] = AuthHeader,
) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    records = await to_thread.run_sync(svc.list_feedback, since, model_version, limit, offset)
    return JSONResponse({"items": [r.to_json() for r in records], "count": len(records),
                         "limit": limit, "offset": offset})


@router.get("/feedback/{feedback_id}", summary="One feedback record",
            responses=docs.responses(200, docs.FEEDBACK_RECORD, 401, 403, 404))
async def get_feedback(feedback_id: str = Path(..., max_length=64),
                       authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    record = await to_thread.run_sync(svc.store.get, feedback_id)
    return JSONResponse(record.to_json())
