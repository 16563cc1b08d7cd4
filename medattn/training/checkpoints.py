"""Resumable training state.

One file, ``last.pt``, rewritten atomically at the end of every epoch. It carries a
*fingerprint* of everything that defines the run (model/train params and the data's hashes):
a re-run with the same fingerprint resumes after the last finished epoch, any other run starts
from scratch, so a stale checkpoint can never leak into a different experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

CHECKPOINT_FILE = "last.pt"


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (params dicts, data hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class TrainingState:
    fingerprint: str
    epoch: int  # last finished epoch (1-based); 0 = nothing done
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("-inf")
    best_model: Optional[dict[str, torch.Tensor]] = None


def save_state(state: TrainingState, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state.__dict__, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact
    return path


def load_state(directory: Path, expected_fingerprint: str) -> Optional[TrainingState]:
    """The saved state if it belongs to this run, else None."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # unreadable checkpoint: start over rather than fail
    if raw.get("fingerprint") != expected_fingerprint:
        return None
    return TrainingState(**raw)
