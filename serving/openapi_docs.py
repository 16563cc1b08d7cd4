"""OpenAPI descriptions of the bodies the routes read by hand (multipart, raw images, feedback).

The routes parse their bodies themselves (to enforce byte limits first, and to accept JSON *or*
multipart on one path), so FastAPI cannot infer these schemas; they are declared here, inline
(no ``$ref``), because BentoML rebuilds the published schema from the routes alone and would
drop components that no route references.
"""

from __future__ import annotations

import copy
from typing import Any

from medattn.feedback.schema import FeedbackSubmission
from medattn.serving.imaging import CONTENT_TYPE_FORMATS

_BINARY = {"type": "string", "format": "binary"}


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``{"$ref": "#/$defs/X"}`` by the definition (pydantic's schemas are acyclic here)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(copy.deepcopy(defs[ref.rsplit("/", 1)[1]]))
            # The discriminator mapping names $defs that no longer exist once inlined.
            return {k: walk(v) for k, v in node.items() if k not in ("$defs", "discriminator")}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(schema)


FEEDBACK_SUBMISSION_SCHEMA = inline_refs(FeedbackSubmission.model_json_schema())

PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": _BINARY, "raw_attention": {"type": "boolean"}}}},
    **{media: {"schema": _BINARY} for media in CONTENT_TYPE_FORMATS if media in
       ("image/png", "image/jpeg", "image/tiff", "application/dicom")},
}}}

PREDICT_BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["images"],
        "properties": {"images": {"type": "array", "items": _BINARY}, "raw_attention": {"type": "boolean"}}}},
}}}

FEEDBACK_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": FEEDBACK_SUBMISSION_SCHEMA},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["feedback"],
        "properties": {"feedback": {"type": "string", "description": "the submission as JSON"},
                       "image": _BINARY}}},
}}}

_STR = {"type": "string"}
_INT = {"type": "integer"}
_MODEL_REF = {"type": "object", "properties": {"name": _STR, "version": _STR}}

ERROR = {"type": "object", "required": ["error", "detail"],
         "properties": {"error": _STR, "detail": _STR}}
PREDICTION = {"type": "object", "required": ["request_id", "label", "probabilities", "model", "image", "attention_png"],
              "properties": {
                  "request_id": _STR, "label": _STR,
                  "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
                  "model": _MODEL_REF,
                  "image": {"type": "object", "properties": {"width": _INT, "height": _INT}},
                  "attention_png": {"type": "string", "description": "base64 PNG, colour-mapped, at the image's size"},
                  "attention": {"type": "object", "description": "only with raw_attention: the map at model resolution",
                                "properties": {"resolution": _STR, "height": _INT, "width": _INT,
                                               "values": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}},
              }}
PREDICTION_LIST = {"type": "array", "items": PREDICTION}
MODEL_STATUS = {"type": "object", "properties": {
    "loaded": {"type": "boolean"}, "model": _MODEL_REF, "class_names": {"type": "array", "items": _STR},
    "image_size": _INT, "last_error": _STR}}
FEEDBACK_RECEIPT = {"type": "object", "properties": {
    "id": _STR, "created_at": _STR, "request_id": _STR, "image_sha256": _STR, "replayed": {"type": "boolean"}}}
FEEDBACK_RECORD = {"type": "object", "properties": {
    "id": _STR, "created_at": _STR, "request_id": _STR, "image_sha256": _STR, "width": _INT, "height": _INT,
    "model_name": _STR, "model_version": _STR, "expert_id": _STR, "rois": {"type": "array", "items": {"type": "object"}},
    "corrected_label": _STR, "comment": _STR}}
FEEDBACK_LIST = {"type": "object", "properties": {
    "items": {"type": "array", "items": FEEDBACK_RECORD}, "count": _INT, "limit": _INT, "offset": _INT}}
ADMIN_RESULT = {"type": "object"}

_REASONS = {
    200: "OK", 201: "Created", 400: "Malformed request", 401: "Missing, malformed or unknown token",
    403: "Token's role is too low", 404: "Unknown request id or feedback id",
    409: "Conflict (Idempotency-Key reused with another body, or the registry refuses)",
    413: "Upload over the byte or pixel limit", 415: "Unsupported content type or image format",
    422: "Unreadable input (not an image, truncated, invalid ROIs, unknown model version)",
    503: "No model loaded yet, or the model runner is overloaded",
}


def responses(*spec: Any) -> dict[int, dict[str, Any]]:
    """``responses(200, SCHEMA, 401, 422)``: a status followed by a schema gets it, others get ERROR."""
    out: dict[int, dict[str, Any]] = {}
    items = list(spec)
    while items:
        status = items.pop(0)
        schema = items.pop(0) if items and isinstance(items[0], dict) else (ERROR if status >= 400 else None)
        entry: dict[str, Any] = {"description": _REASONS.get(status, "")}
        if schema is not None:
            entry["content"] = {"application/json": {"schema": schema}}
        out[status] = entry
    return out
