"""Device names (``params.yaml: train.device``, ``MEDATTN_DEVICE``, ``--device``) -> ``torch.device``.

One meaning everywhere:

- ``auto``: the current CUDA device when CUDA is available, else the CPU;
- ``cpu``;
- ``cuda`` / ``cuda:N``: that GPU. Without CUDA at all this falls back to the CPU, with one
  logged warning per process and name, so a config written for a GPU host still runs on a
  laptop; on a CUDA host an ``N`` past the last GPU is an error (a typo, not a missing GPU);
- anything else is a :class:`~medattn.errors.ParamError` naming the value.
"""

from __future__ import annotations

import logging
import re

import torch

from medattn.errors import ParamError

log = logging.getLogger(__name__)

_CUDA_NAME = re.compile(r"cuda(?::(\d+))?")
# Names already warned about: a serving process resolves its device once per model load.
_fallback_warned: set[str] = set()


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` that ``name`` means on this machine (see the module docstring)."""
    if not isinstance(name, str):
        raise ParamError(f"device must be a string such as 'auto', 'cpu', 'cuda' or 'cuda:0', got {name!r}")
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_NAME.fullmatch(text)
    if match is None:
        raise ParamError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        if text not in _fallback_warned:
            _fallback_warned.add(text)
            log.warning("device %r asked for, but CUDA is not available: using the CPU", name)
        return torch.device("cpu")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise ParamError(f"device {name!r}: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)
