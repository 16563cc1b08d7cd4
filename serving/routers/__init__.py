"""One FastAPI router per concern of the HTTP surface: ``predict``, ``feedback``, ``admin``.

Each router only parses requests and formats answers; the backend of the running service
(:func:`serving.routers.context.backend`) does the work. ``serving.app`` includes them all, so a
new concern (the review page) is one more module here and one more line there.
"""
