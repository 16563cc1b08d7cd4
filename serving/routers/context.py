"""What every route needs besides its request: the service's backend and the token header."""

from __future__ import annotations

import bentoml
from fastapi import Header

from medattn.serving.backend import ServingBackend

AuthHeader = Header(None, description="'Bearer <token>'; roles predict < expert < admin")


def backend() -> ServingBackend:
    """The backend of the running service instance (set up by serving.service at start)."""
    return bentoml.get_current_service().backend
