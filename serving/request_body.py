"""Reading request bodies by hand: a byte limit first, then multipart or raw image bytes.

Request bodies are read with a byte limit before anything is parsed, so an oversized upload is
refused with 413 without being buffered whole; the multipart parser then runs on the bytes
already read. Every refusal is an :class:`~medattn.serving.imaging.ImageRejected` (or
:class:`~medattn.serving.backend.HttpProblem`) carrying its status.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import Request
from starlette.datastructures import FormData, UploadFile

from medattn.serving.backend import HttpProblem, Upload
from medattn.serving.imaging import ImageRejected, normalize_content_type


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
    return await upload_of(values[0], name)


async def upload_of(value: Any, name: str) -> Upload:
    """One multipart value as an :class:`Upload`; a text value where a file belongs is a 422."""
    if not isinstance(value, UploadFile):
        raise ImageRejected(422, f"multipart field {name!r} must be a file, not a text value")
    return Upload(data=await value.read(), content_type=value.content_type or "", field=name)


def truthy_field(value: Any, name: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ImageRejected(422, f"form field {name!r} must be true or false, got {str(value)[:40]!r}")


def media_type(request: Request) -> str:
    return normalize_content_type(request.headers.get("content-type"))
