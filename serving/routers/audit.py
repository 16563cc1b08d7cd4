"""``GET /audit`` (admin): who gave feedback, promoted, rolled back or recalibrated, when, from which version to which.

The append-only audit table itself belongs to ``medattn.feedback.audit`` (built beside this
router, by another change). This route is written against the small interface below, so it lists
whatever that table holds without knowing its storage; until the module exists the route answers
404 with a one-line reason (the resource is not there; not a server fault, and not an empty trail).

Expected of ``medattn.feedback.audit``: ``AuditLog(database_url)`` whose ``list_events(since=,
limit=, offset=)`` returns events oldest first, each a mapping or an object with ``to_json()``.
"""

from __future__ import annotations

import importlib
from datetime import datetime
from typing import Any, Mapping, Optional, Protocol, Sequence

from anyio import to_thread
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from medattn.serving.backend import HttpProblem, ServingBackend
from serving.routers.context import AuthHeader, backend

router = APIRouter(tags=["admin"])

MAX_AUDIT_PAGE = 1000
AUDIT_MODULE = "medattn.feedback.audit"


class AuditTrail(Protocol):
    """What this route needs of the audit table."""

    def list_events(self, *, since: Optional[datetime], limit: int, offset: int) -> Sequence[Any]: ...


def open_trail(svc: ServingBackend) -> AuditTrail:
    try:
        module = importlib.import_module(AUDIT_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != AUDIT_MODULE:
            raise  # the module exists but is broken: a bug, not a missing feature
        raise HttpProblem(404, f"the audit table ({AUDIT_MODULE}) is not part of this build") from None
    return module.AuditLog(svc.settings.feedback_db)


def event_json(event: Any) -> Mapping[str, Any]:
    return event.to_json() if hasattr(event, "to_json") else dict(event)


@router.get("/audit", summary="The audit trail: who did what to which model version, oldest first")
async def audit(
    since: Optional[datetime] = Query(None, description="ISO 8601; events at or after it"),
    limit: int = Query(100, ge=1, le=MAX_AUDIT_PAGE),
    offset: int = Query(0, ge=0, le=10**9),
    authorization: Optional[str] = AuthHeader,
) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "admin")

    def listed() -> list[Mapping[str, Any]]:
        trail = open_trail(svc)
        return [event_json(e) for e in trail.list_events(since=since, limit=limit, offset=offset)]

    items = await to_thread.run_sync(listed)
    return JSONResponse({"items": items, "count": len(items), "limit": limit, "offset": offset})
