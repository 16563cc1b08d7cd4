"""``GET /audit`` (admin): who gave feedback, promoted, rolled back or recalibrated, when, from which version to which.

The rows come straight from the append-only table of :mod:`medattn.feedback.audit`, in the
service's feedback database (the same one the CLI, the register stage and the recalibration
job write to when they share ``MEDATTN_FEEDBACK_DB`` / the state folder). Oldest first, paged
with ``limit`` / ``offset``; ``next_offset`` is null on the last page. A bad filter is a 422
JSON answer (an unknown ``action``, a ``since`` that is not ISO 8601, a page out of range).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from anyio import to_thread
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from medattn.feedback.audit import ACTIONS, list_events
from medattn.feedback.schema import MAX_NAME_LENGTH
from medattn.feedback.store import MAX_PAGE
from serving.routers.context import AuthHeader, backend

router = APIRouter(tags=["admin"])


@router.get("/audit", summary="The audit trail: who did what to which model version, oldest first")
async def audit(
    action: Optional[str] = Query(None, description=f"only this action: {', '.join(ACTIONS)}", max_length=32),
    model_name: Optional[str] = Query(None, max_length=MAX_NAME_LENGTH, description="only events of this model"),
    since: Optional[datetime] = Query(None, description="ISO 8601; events at or after it (UTC if no zone)"),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
    offset: int = Query(0, ge=0, le=10**9),
    authorization: Optional[str] = AuthHeader,
) -> JSONResponse:
    svc = backend()
    svc.authorize(authorization, "admin")

    def listed() -> list[dict[str, Any]]:
        # InvalidFeedback (an unknown action) maps to 422 through the service's error handler
        events = list_events(svc.store, action=action, model_name=model_name, since=since, limit=limit,
                             offset=offset)
        return [event.to_json() for event in events]

    items = await to_thread.run_sync(listed)
    return JSONResponse({"items": items, "count": len(items), "limit": limit, "offset": offset,
                         "next_offset": offset + len(items) if len(items) == limit else None})
