"""The expert review page (``GET /review``) and the few routes only it needs, under ``/review/api``.

The page itself is static (``serving/static/review/``: HTML, CSS, plain JavaScript, no CDN, so it
works offline) and talks to the ordinary API for what exists already: ``POST /predict`` (the
champion, recorded so feedback can cite its ``request_id``), ``POST /feedback``, ``GET /model``,
``POST /promote`` and ``/rollback``. What it adds here:

- ``GET  /review/api/whoami``: the token's name and role (the page fills ``expert_id`` with it);
- ``GET  /review/api/method?model=``: a version's attention method (is its map one for all images?);
- ``GET  /review/api/models``: every registered version with aliases, metrics and lifecycle tags;
- ``POST /review/api/predict?model=challenger|champion|<n>``: any version's prediction on an image
  (for "show differences"), loaded in this worker, *not* recorded as a served prediction;
- ``POST /review/api/render``: the upload decoded exactly as the service decodes it (DICOM and
  TIFF included), as a PNG the browser can draw, plus whether it is grey-level;
- ``GET  /review/api/predictions/{request_id}``: a stored prediction with its image and the map
  of the version that made it, so an expert can open it later;
- ``GET  /review/api/colormaps``: the colour maps of the project's figures, so the page's maps
  look like ``reports/*/figures``;
- ``GET  /review/api/scheduler``: the recalibration scheduler's state now (running or not, last
  run and outcome, next run, pending feedback; :func:`medattn.feedback.scheduler.current_state`,
  the same source as the ``medattn_recalibration_*`` gauges on ``/metrics``).

Every API route needs an expert token (sent by the page from sessionStorage); the page's files
need none (they hold no data).
"""

from __future__ import annotations

import base64
import io
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from medattn.errors import RegistryError
from medattn.serving.backend import HttpProblem, ServingBackend, Upload
from medattn.serving.imaging import ACCEPTED_CONTENT_TYPES, DecodedImage, ImageRejected, decode_image
from medattn.serving.inference import build_payload
from medattn.serving.model_versions import VersionPredictors, model_history
from serving.request_body import file_field, media_type, read_body, read_form
from serving.routers.context import AuthHeader, backend

router = APIRouter(tags=["review"])

STATIC_DIR = Path(__file__).resolve().parents[1] / "static" / "review"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
ModelQuery = Query("challenger", max_length=100, description="version number or alias (champion, challenger)")

_predictors_lock = threading.Lock()
_predictors: dict[tuple[str, str, str, str], VersionPredictors] = {}


def version_predictors(svc: ServingBackend) -> VersionPredictors:
    """One cache of loaded versions per service configuration (one per API worker in practice)."""
    s = svc.settings
    key = (s.model_name, s.tracking_uri, str(s.model_cache_dir), s.device)
    with _predictors_lock:
        if key not in _predictors:
            _predictors[key] = VersionPredictors(s.model_name, s.tracking_uri, s.model_cache_dir, s.device)
        return _predictors[key]


# -- the page -----------------------------------------------------------------------------------


@router.get("/review", include_in_schema=False)
async def review_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"],
                        headers={"Cache-Control": "no-cache"})


@router.get("/review/", include_in_schema=False)
async def review_page_slash() -> RedirectResponse:
    return RedirectResponse("/review", status_code=308)


@router.get("/review/static/{name:path}", include_in_schema=False)
async def review_asset(name: str) -> FileResponse:
    path = (STATIC_DIR / name).resolve()
    # Only files inside the page's folder, of a known type: no path can climb out of it.
    if STATIC_DIR not in path.parents or not path.is_file() or path.suffix not in _MEDIA_TYPES:
        raise HttpProblem(404, f"no review page file {name!r}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


# -- what the page asks ---------------------------------------------------------------------------


@router.get("/review/api/colormaps", summary="Colour maps of the attention and difference views")
async def colormaps() -> JSONResponse:
    return JSONResponse(_colormaps())


@lru_cache(maxsize=1)
def _colormaps() -> dict[str, list[list[int]]]:
    from medattn.evaluation.figures import colorize_attention

    ramp = np.linspace(0.0, 1.0, 256)[None, :]
    return {"attention": colorize_attention(ramp)[0].astype(int).tolist(),
            "difference": colorize_attention(ramp, cmap="RdBu_r")[0].astype(int).tolist()}


@router.get("/review/api/scheduler", summary="The recalibration scheduler's state now")
async def scheduler_state(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    from medattn.feedback.scheduler import current_state

    svc = backend()
    svc.authorize(authorization, "expert")
    state = await to_thread.run_sync(lambda: current_state(svc.settings.state_dir, svc.store,
                                                           rules=svc.recalibration_rules))
    return JSONResponse(state.to_json())


@router.get("/review/api/whoami", summary="Whose token this is, and its role")
async def whoami(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    principal = backend().authorize(authorization, "predict")
    return JSONResponse({"name": principal.name, "role": principal.role})


@router.get("/review/api/method", summary="The attention method of a version (one map for all images or not)")
async def method(model: str = ModelQuery, authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    predictor = await to_thread.run_sync(_predictor, svc, model)
    return JSONResponse({"version": predictor.ref.version, **_method_of(predictor)})


@router.get("/review/api/models", summary="Registered versions with aliases and figures, newest first")
async def models(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    history = await to_thread.run_sync(model_history, svc.settings.model_name, svc.settings.tracking_uri)
    return JSONResponse(history)


@router.post("/review/api/predict", summary="A chosen version's prediction and map (not recorded)")
async def predict_with_version(request: Request, model: str = ModelQuery,
                               authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    upload = await _one_image(request, svc)
    decoded = await to_thread.run_sync(_decode, svc, upload)
    return JSONResponse(await to_thread.run_sync(_version_payload, svc, model, decoded))


@router.post("/review/api/render", summary="The upload decoded as the service decodes it, as PNG")
async def render(request: Request, authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    upload = await _one_image(request, svc)
    decoded = await to_thread.run_sync(_decode, svc, upload)
    return JSONResponse(await to_thread.run_sync(_rendered, decoded))


@router.get("/review/api/predictions/{request_id}", summary="A stored prediction, its image and its map")
async def stored_prediction(request_id: str = PathParam(..., min_length=1, max_length=128),
                            authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "expert")
    return JSONResponse(await to_thread.run_sync(_stored, svc, request_id))


# -- the work (blocking: run in a thread) ----------------------------------------------------------


async def _one_image(request: Request, svc: ServingBackend) -> Upload:
    body = await read_body(request, svc.settings.max_upload_bytes)
    media = media_type(request)
    if media == "multipart/form-data":
        form = await read_form(request, body, svc.settings.max_upload_bytes, max_files=1)
        return await file_field(form, "image")
    if media in ACCEPTED_CONTENT_TYPES:
        return Upload(data=body, content_type=media, field="body")
    raise ImageRejected(415, f"content type {media or 'none'!r}: send multipart/form-data with an 'image' "
                             f"file, or the image bytes as one of {', '.join(ACCEPTED_CONTENT_TYPES)}")


def _decode(svc: ServingBackend, upload: Upload) -> DecodedImage:
    return decode_image(upload.data, upload.content_type, svc.settings.image_limits)


def _predictor(svc: ServingBackend, model: str):
    try:
        return version_predictors(svc).get(model)
    except RegistryError as exc:
        raise HttpProblem(404, str(exc)) from None


def _method_of(predictor) -> dict[str, Any]:
    spec = predictor.spec
    # seed 001's map is one map for all images: the page says the ROIs of many images combine
    return {"attention": spec.attention, "backbone": spec.backbone, "global_map": spec.attention == "global_pixel"}


def _version_payload(svc: ServingBackend, model: str, decoded: DecodedImage) -> dict[str, Any]:
    predictor = _predictor(svc, model)
    [raw] = predictor.predict([decoded.image])
    payload = build_payload(raw, decoded.width, decoded.height, request_id="", include_raw_attention=True)
    del payload["request_id"]  # not recorded: feedback must cite the champion's served prediction
    payload["method"] = _method_of(predictor)
    return payload


def _rendered(decoded: DecodedImage) -> dict[str, Any]:
    pixels = np.asarray(decoded.image)
    grey = bool(np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))
    buffer = io.BytesIO()
    (decoded.image.convert("L") if grey else decoded.image).save(buffer, format="PNG", compress_level=1)
    return {"width": decoded.width, "height": decoded.height, "format": decoded.format, "grey": grey,
            "image_png": base64.b64encode(buffer.getvalue()).decode("ascii")}


def _stored(svc: ServingBackend, request_id: str) -> dict[str, Any]:
    record = svc.store.get_prediction(request_id)  # UnknownRequest -> 404
    data = svc.blobs.get(record.image_sha256)
    decoded = decode_image(data, None, svc.settings.image_limits)
    stored = {"request_id": record.request_id, "created_at": record.created_at.isoformat(),
              "model": {"name": record.model_name, "version": record.model_version},
              "label": record.label, "probabilities": record.probabilities}
    try:
        prediction = _version_payload(svc, record.model_version, decoded)
    except HttpProblem as exc:
        prediction = {"error": str(exc)}  # its version was deleted: the image and ROIs still count
    return {"stored": stored, "render": _rendered(decoded), "prediction": prediction}
