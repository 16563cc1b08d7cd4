"""The served model and its lifecycle: ``GET /model``; admin ``POST /reload``, ``/promote``, ``/rollback``.

``GET /model`` needs only a predict token (clients may ask which version answers them); it sits
here, with the routes that change that version, and keeps its ``predict`` tag in the API docs.
"""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving import openapi_docs as docs
from serving.routers.context import AuthHeader, backend

router = APIRouter()

_ADMIN_RESPONSES = docs.responses(200, docs.ADMIN_RESULT, 401, 403, 409, 503)


@router.get("/model", tags=["predict"], summary="The model being served",
            responses=docs.responses(200, docs.MODEL_STATUS, 401, 403))
async def model_status(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "predict")
    return JSONResponse(await svc.model_status())


async def _admin_action(authorization: Optional[str], action: str) -> JSONResponse:
    """Authorise an admin, then run the backend's ``reload``, ``promote`` or ``rollback``.

    Promote and rollback are audited under the token's name (``GET /audit``).
    """
    svc = backend()
    principal = svc.authorize(authorization, "admin")
    if action == "reload":
        return JSONResponse(await svc.reload())
    return JSONResponse(await getattr(svc, action)(principal.name))


@router.post("/reload", tags=["admin"], summary="Serve the current champion now (no restart)",
             responses=_ADMIN_RESPONSES)
async def reload_model(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    return await _admin_action(authorization, "reload")


@router.post("/promote", tags=["admin"], summary="Make the challenger champion and serve it",
             responses=_ADMIN_RESPONSES)
async def promote(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    return await _admin_action(authorization, "promote")


@router.post("/rollback", tags=["admin"], summary="Return champion to the previous version and serve it",
             responses=_ADMIN_RESPONSES)
async def rollback(authorization: Optional[str] = AuthHeader) -> JSONResponse:
    return await _admin_action(authorization, "rollback")
