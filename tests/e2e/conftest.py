"""Fixtures of the service end-to-end tests (the machinery is in ``service_harness``).

``registry`` (module scope) makes a fresh MLflow sqlite database whose model has a tiny random
version 1 as champion; ``served`` starts a real ``bentoml serve`` on it (once per module: start-up
takes several seconds) and stops it at teardown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from service_harness import MODEL_NAME, Served, make_tiny_bundle, register_version, start_served


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[str, Path]:
    """A fresh MLflow db whose model MODEL_NAME has version 1 as champion."""
    from medattn.registry import assign_challenger_and_gate

    workdir = tmp_path_factory.mktemp("served")
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    version = register_version(tracking_uri, make_tiny_bundle(workdir / "bundle-v1", seed=1), metric=0.5)
    decision = assign_challenger_and_gate(MODEL_NAME, version, tracking_uri=tracking_uri)
    assert decision.promoted, decision.reason
    return tracking_uri, workdir


@pytest.fixture(scope="module")
def served(registry) -> Iterator[Served]:
    running = start_served(registry)
    try:
        yield running
    finally:
        running.server.stop()
