"""Predictions: ``POST /predict`` (one image) and ``POST /predict_batch`` (several)."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from medattn.serving.backend import Upload
from medattn.serving.imaging import ACCEPTED_CONTENT_TYPES, ImageRejected
from serving import openapi_docs as docs
from serving.request_body import file_field, media_type, read_body, read_form, truthy_field, upload_of
from serving.routers.context import AuthHeader, backend

router = APIRouter(tags=["predict"])

RawAttentionQuery = Query(False, description="also return the raw attention map (model resolution)")


@router.post("/predict", summary="Predict one image, with its attention map",
             openapi_extra=docs.PREDICT_BODY,
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
    [payload] = await svc.predict([upload], raw_attention)
    return JSONResponse(payload)


@router.post("/predict_batch", summary="Predict several images in one request",
             openapi_extra=docs.PREDICT_BATCH_BODY,
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
    raw_attention = raw_attention or truthy_field(form.get("raw_attention", ""), "raw_attention")
    return JSONResponse(await svc.predict(uploads, raw_attention))
