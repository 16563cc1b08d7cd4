"""The HTTP surface of the medattn service: one FastAPI app, mounted into the BentoML API service.

FastAPI (rather than ``@bentoml.api`` routes) gives full control of status codes, headers
(``Authorization``, ``Idempotency-Key``, ``Location``) and error bodies, while BentoML still owns
the process, ``/livez``, ``/readyz``, ``/metrics`` and the model runner. This module only
assembles: one router per concern (:mod:`serving.routers`) and the error handlers
(:mod:`serving.http_errors`); :class:`medattn.serving.backend.ServingBackend` does the work.
"""

from __future__ import annotations

from fastapi import FastAPI

from serving.http_errors import install_error_handlers
from serving.routers import admin, audit, feedback, predict, review

app = FastAPI(
    title="medattn",
    version="1",
    description="Attention-guided medical image classification: predictions with attention maps, "
                "expert feedback, model switching.",
    docs_url=None, redoc_url=None,  # BentoML serves its own UI at "/"
)
install_error_handlers(app)
for router in (predict.router, feedback.router, admin.router, audit.router, review.router):
    app.include_router(router)
