"""Predictions: ``POST /predict`` (one image) and ``POST /predict_batch`` (several)."""

from __future__ import annotations

from typing import Optional

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from medattn.serving.backend import Upload
from medattn.serving.decode_budget import DecodeBudget
from medattn.serving.imaging import ACCEPTED_CONTENT_TYPES, ImageLimits, ImageRejected, probe_image
from medattn.serving.settings import ServingSettings
from serving import openapi_docs as docs
from serving.request_body import file_field, media_type, read_body, read_form, truthy_field, upload_of
from serving.routers.context import AuthHeader, backend

router = APIRouter(tags=["predict"])

RawAttentionQuery = Query(False, description="also return the raw attention map (model resolution)")
FRAME_DOC = ("The attention map (`attention_png`) and the `image` size answered are in the image's frame: the "
             "upload as displayed (EXIF orientation applied) and, when it has more than "
             "MEDATTN_MAX_FRAME_PIXELS pixels, reduced by an integer factor. ROIs sent to /feedback use this "
             "frame. 413 names the limit passed: bytes, pixels, decoded bytes per image "
             "(MEDATTN_MAX_DECODED_BYTES) or per request (MEDATTN_MAX_BATCH_DECODED_BYTES); 422 an image "
             "wider than MEDATTN_MAX_ASPECT_RATIO; 503 when the worker already decodes "
             "MEDATTN_MAX_INFLIGHT_DECODED_BYTES for other requests and this one waited "
             "MEDATTN_DECODE_WAIT_SECONDS.")


_budget: Optional[DecodeBudget] = None


def decode_budget(settings: ServingSettings) -> DecodeBudget:
    """This process's budget of decoded bytes in flight (one per API worker)."""
    global _budget
    if _budget is None:
        _budget = DecodeBudget(settings.max_inflight_decoded_bytes, settings.decode_wait_seconds)
    return _budget


def check_batch_decoded_bytes(uploads: list[Upload], limits: ImageLimits, max_batch_decoded_bytes: int) -> int:
    """Read every header first: the request is refused before any image of it is decoded.

    Per-image problems (format, pixels, decoded bytes, aspect ratio) are answered here too, named
    ``images[i]``; then the decode estimates are summed against the per-request budget.
    """
    total = 0
    for index, upload in enumerate(uploads):
        if len(uploads) == 1:
            return probe_image(upload.data, upload.content_type, limits).decoded_bytes
        try:
            total += probe_image(upload.data, upload.content_type, limits).decoded_bytes
        except ImageRejected as exc:
            raise ImageRejected(exc.status_code, f"{upload.field}[{index}]: {exc}") from None
    if total > max_batch_decoded_bytes:
        raise ImageRejected(413, f"the {len(uploads)} images would take {total} bytes to decode, over the "
                                 f"limit of {max_batch_decoded_bytes} decoded bytes per request; send fewer "
                                 "or smaller images per request")
    return total


@router.post("/predict", summary="Predict one image, with its attention map",
             openapi_extra=docs.PREDICT_BODY,
             description="The image as multipart field `image` (or the raw bytes with an image content type). "
                         + FRAME_DOC,
             responses=docs.responses(200, docs.PREDICTION, 401, 403, 413, 415, 422, 503))
async def predict(request: Request, raw_attention: bool = RawAttentionQuery,
                  authorization: Optional[str] = AuthHeader) -> JSONResponse:
    """The image as multipart field ``image`` (or the raw bytes with an image content type)."""
    svc = backend()
    svc.authorize(authorization, "predict")
    body = await read_body(request, svc.settings.max_upload_bytes)
    media = media_type(request)
    if media == "multipart/form-data":
        form = await read_form(request, body, svc.settings.max_upload_bytes, max_files=1)
        upload = await file_field(form, "image")
        raw_attention = raw_attention or truthy_field(form.get("raw_attention", ""), "raw_attention")
    elif media in ACCEPTED_CONTENT_TYPES:
        upload = Upload(data=body, content_type=media, field="body")
    else:
        raise ImageRejected(415, f"content type {media or 'none'!r}: send multipart/form-data with an "
                                 f"'image' file, or the image bytes as one of {', '.join(ACCEPTED_CONTENT_TYPES)}")
    cost = await to_thread.run_sync(check_batch_decoded_bytes, [upload], svc.settings.image_limits,
                                    svc.settings.max_batch_decoded_bytes)
    async with decode_budget(svc.settings).reserve(cost):
        [payload] = await svc.predict([upload], raw_attention)
    return JSONResponse(payload)


@router.post("/predict_batch", summary="Predict several images in one request",
             openapi_extra=docs.PREDICT_BATCH_BODY,
             description="Images as repeated multipart fields `images`; answers a list in the same order. "
                         + FRAME_DOC,
             responses=docs.responses(200, docs.PREDICTION_LIST, 401, 403, 413, 415, 422, 503))
async def predict_batch(request: Request, raw_attention: bool = RawAttentionQuery,
                        authorization: Optional[str] = AuthHeader) -> JSONResponse:
    """Images as repeated multipart fields ``images``; answers a list in the same order."""
    svc = backend()
    svc.authorize(authorization, "predict")
    body = await read_body(request, svc.settings.max_upload_bytes)
    if media_type(request) != "multipart/form-data":
        raise ImageRejected(415, "send the images as multipart/form-data, repeated field 'images'")
    limit = svc.settings.max_batch_images
    form = await read_form(request, body, svc.settings.max_upload_bytes, max_files=limit + 1)
    values = form.getlist("images")
    if not values:
        raise ImageRejected(422, "multipart body has no 'images' file fields")
    if len(values) > limit:
        raise ImageRejected(413, f"{len(values)} images in one request, over the limit of {limit}")
    uploads = [await upload_of(value, "images") for value in values]
    cost = await to_thread.run_sync(check_batch_decoded_bytes, uploads, svc.settings.image_limits,
                                    svc.settings.max_batch_decoded_bytes)
    raw_attention = raw_attention or truthy_field(form.get("raw_attention", ""), "raw_attention")
    async with decode_budget(svc.settings).reserve(cost):
        payloads = await svc.predict(uploads, raw_attention)
    return JSONResponse(payloads)
