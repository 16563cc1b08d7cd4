"""The HTTP surface of the medattn service: a FastAPI app mounted into the BentoML API service.

FastAPI (rather than ``@bentoml.api`` routes) gives full control of status codes, headers
(``Authorization``, ``Idempotency-Key``, ``Location``) and error bodies, while BentoML still owns
the process, ``/livez``, ``/readyz``, ``/metrics`` and the model runner. Routes parse the request
and format the answer; :class:`medattn.serving.backend.ServingBackend` does the work.

Every error is ``{"error": "<HTTP reason>", "detail": "<one line saying what is wrong>"}``: client
mistakes are 4xx, an unavailable model 503, and only a bug is a 500 (logged with its traceback).
Request bodies are read with a byte limit before anything is parsed, so an oversized upload is
refused with 413 without being buffered whole.
"""

from __future__ import annotations

import logging
from datetime import datetime
from http import HTTPStatus
from typing import Any, Optional

import bentoml
from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from medattn.errors import MedattnError
from medattn.feedback.schema import InvalidFeedback, parse_submission
from medattn.feedback.store import MAX_PAGE
from medattn.serving import metrics
from medattn.serving.imaging import ACCEPTED_CONTENT_TYPES, ImageRejected, normalize_content_type
from serving import openapi_docs as docs
from medattn.serving.backend import HttpProblem, ServingBackend, Upload, http_status_of

log = logging.getLogger("medattn.serving")

app = FastAPI(
    title="medattn",
    version="1",
    description="Attention-guided medical image classification: predictions with attention maps, "
                "expert feedback, model switching.",
    docs_url=None, redoc_url=None,  # BentoML serves its own UI at "/"
)

AuthHeader = Header(None, description="'Bearer <token>'; roles predict < expert < admin")
RawAttentionQuery = Query(False, description="also return the raw attention map (model resolution)")


def backend() -> ServingBackend:
    """The backend of the running service instance (set up by serving.service at start)."""
    return bentoml.get_current_service().backend


# -- errors --------------------------------------------------------------------------------------


_STATUS_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "5"}}


def error_response(status: int, detail: str, endpoint: str = "", error_type: str = "") -> JSONResponse:
    if endpoint:
        metrics.record_error(endpoint=endpoint, http_status=status, error_type=error_type or "HTTPError")
    headers = _STATUS_HEADERS.get(status)
    return JSONResponse({"error": HTTPStatus(status).phrase.lower(), "detail": detail},
                        status_code=status, headers=headers)


def _endpoint(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or request.url.path


@app.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    status = http_status_of(exc)
    if status is None:
        log.exception("bug while serving %s %s", request.method, request.url.path)
        return error_response(500, "internal error; the server log has the details",
                              _endpoint(request), exc.__class__.__name__)
    return error_response(status, str(exc), _endpoint(request), exc.__class__.__name__)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(422, "; ".join(problems) or "invalid request", _endpoint(request), "RequestValidationError")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), _endpoint(request), "HTTPException")


# Registered for MedattnError too (every expected error is one): Starlette then answers it in its
# ExceptionMiddleware, whereas the Exception handler runs in ServerErrorMiddleware, which re-raises.
app.add_exception_handler(MedattnError, _any_error)


# -- request body helpers ------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HttpProblem(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ImageRejected(413, f"request body is {int(declared)} bytes, over the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ImageRejected(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request, body: bytes, limit: int, max_files: int) -> FormData:
    """Parse a multipart body already read (and size-checked) by :func:`read_body`."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, replay).form(max_files=max_files, max_fields=32, max_part_size=limit)


async def file_field(form: FormData, name: str, required: bool = True) -> Optional[Upload]:
    values = form.getlist(name)
    if not values:
        if required:
            raise ImageRejected(422, f"multipart body has no {name!r} file field")
        return None
    if len(values) > 1:
        raise ImageRejected(422, f"multipart body has {len(values)} {name!r} fields; send one")
    return await _upload(values[0], name)


async def _upload(value: Any, name: str) -> Upload:
    if not isinstance(value, UploadFile):
        raise ImageRejected(422, f"multipart field {name!r} must be a file, not a text value")
    return Upload(data=await value.read(), content_type=value.content_type or "", field=name)


def _truthy(value: Any, name: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ImageRejected(422, f"form field {name!r} must be true or false, got {str(value)[:40]!r}")


def _media_type(request: Request) -> str:
    return normalize_content_type(request.headers.get("content-type"))


# -- predictions ---------------------------------------------------------------------------------


@app.post("/predict", tags=["predict"], summary="Predict one image, with its attention map",
          openapi_extra=docs.PREDICT_BODY, responses=docs.responses(200, docs.PREDICTION, 401, 403, 413, 415, 422, 503))
async def predict(request: Request, raw_attention: bool = RawAttentionQuery,
                  authorization: Optional[str] = AuthHeader) -> JSONResponse:
    """The image as multipart field ``image`` (or the raw bytes with an image content type)."""
    svc = backend()
    svc.authorize(authorization, "predict")
    body = await read_body(request, svc.settings.max_upload_bytes)
    media = _media_type(request)
    if media == "multipart/form-data":
        form = await read_form(request, body, svc.settings.max_upload_bytes, max_files=1)
        upload = await file_field(form, "image")
        raw_attention = raw_attention or _truthy(form.get("raw_attention", ""), "raw_attention")
    elif media in ACCEPTED_CONTENT_TYPES:
        upload = Upload(data=body, content_type=media, field="body")
    else:
        raise ImageRejected(415, f"content type {media or 'none'!r}: send multipart/form-data with an "
                                 f"'image' file, or the image bytes as one of {', '.join(ACCEPTED_CONTENT_TYPES)}")
    [payload] = await svc.predict([upload], raw_attention)
    return JSONResponse(payload)


@app.post("/predict_batch", tags=["predict"], summary="Predict several images in one request",
          openapi_extra=docs.PREDICT_BATCH_BODY,
          responses=docs.responses(200, docs.PREDICTION_LIST, 401, 403, 413, 415, 422, 503))
async def predict_batch(request: Request, raw_attention: bool = RawAttentionQuery,
                        authorization: Optional[str] = AuthHeader) -> JSONResponse:
    """Images as repeated multipart fields ``images``; answers a list in the same order."""
    svc = backend()
    svc.authorize(authorization, "predict")
    body = await read_body(request, svc.settings.max_upload_bytes)
    if _media_type(request) != "multipart/form-data":
        raise ImageRejected(415, "send the images as multipart/form-data, repeated field 'images'")
    limit = svc.settings.max_batch_images
    form = await read_form(request, body, svc.settings.max_upload_bytes, max_files=limit + 1)
    values = form.getlist("images")
    if not values:
        raise ImageRejected(422, "multipart body has no 'images' file fields")
    if len(values) > limit:
        raise ImageRejected(413, f"{len(values)} images in one request, over the limit of {limit}")
    uploads = [await _upload(value, "images") for value in values]
    raw_attention = raw_attention or _truthy(form.get("raw_attention", ""), "raw_attention")
    return JSONResponse(await svc.predict(uploads, raw_attention))


@app.get("/model", tags=["predict"], summary="The model being served",
         responses=docs.responses(200, docs.MODEL_STATUS, 401, 403))
async def model_status(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "predict")
    return JSONResponse(await svc.model_status())


# -- feedback ------------------------------------------------------------------------------------


@app.post("/feedback", tags=["feedback"], status_code=201, summary="Store an expert's feedback (durably)",
          openapi_extra=docs.FEEDBACK_BODY,
          responses=docs.responses(201, docs.FEEDBACK_RECEIPT, 200, docs.FEEDBACK_RECEIPT, 401, 403, 404, 409, 413, 415, 422, 503))
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
    media = _media_type(request)
    image = None
    if media == "application/json":
        submission = parse_submission(body)
    elif media == "multipart/form-data":
        form = await read_form(request, body, svc.settings.max_upload_bytes, max_files=1)
        raw = form.get("feedback")
        if raw is None:
            raise InvalidFeedback("multipart body has no 'feedback' field (the submission as JSON)")
        submission = parse_submission(await raw.read() if isinstance(raw, UploadFile) else raw)
        image = await file_field(form, "image", required=False)
    else:
        raise ImageRejected(415, f"content type {media or 'none'!r}: send application/json, or "
                                 "multipart/form-data with 'feedback' and 'image'")
    record, created = await run_in_threadpool(svc.submit_feedback, principal, submission, image, idempotency_key)
    receipt = {"id": str(record.id), "created_at": record.created_at.isoformat(),
               "request_id": record.request_id, "image_sha256": record.image_sha256, "replayed": not created}
    return JSONResponse(receipt, status_code=201 if created else 200, headers={"Location": f"/feedback/{record.id}"})


@app.get("/feedback", tags=["feedback"], summary="List feedback, oldest first",
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
    records = await run_in_threadpool(svc.list_feedback, since, model_version, limit, offset)
    return JSONResponse({"items": [r.to_json() for r in records], "count": len(records),
                         "limit": limit, "offset": offset})


@app.get("/feedback/{feedback_id}", tags=["feedback"], summary="One feedback record",
         responses=docs.responses(200, docs.FEEDBACK_RECORD, 401, 403, 404))
async def get_feedback(feedback_id: str = Path(..., max_length=64),
                       authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    record = await run_in_threadpool(svc.store.get, feedback_id)
    return JSONResponse(record.to_json())


# -- model lifecycle (admin) ---------------------------------------------------------------------


async def _admin_action(authorization: Optional[str], action: str) -> JSONResponse:
    """Authorise an admin, then run the backend's ``reload``, ``promote`` or ``rollback``."""
    svc = backend()
    svc.authorize(authorization, "admin")
    return JSONResponse(await getattr(svc, action)())


@app.post("/reload", tags=["admin"], summary="Serve the current champion now (no restart)",
          responses=docs.responses(200, docs.ADMIN_RESULT, 401, 403, 409, 503))
async def reload_model(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    return await _admin_action(authorization, "reload")


@app.post("/promote", tags=["admin"], summary="Make the challenger champion and serve it",
          responses=docs.responses(200, docs.ADMIN_RESULT, 401, 403, 409, 503))
async def promote(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    return await _admin_action(authorization, "promote")


@app.post("/rollback", tags=["admin"], summary="Return champion to the previous version and serve it",
          responses=docs.responses(200, docs.ADMIN_RESULT, 401, 403, 409, 503))
async def rollback(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    return await _admin_action(authorization, "rollback")
