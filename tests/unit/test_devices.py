"""resolve_device: one meaning of a device name for training, evaluation and serving.

The branches for "CUDA present" and "CUDA absent" are both run on every machine by setting what
``torch.cuda`` reports; the first test uses whatever this machine really has.
"""

from __future__ import annotations

import logging

import pytest
import torch

from medattn import devices
from medattn.devices import resolve_device
from medattn.errors import ParamError


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_fallback_warned", set())


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_a_device_this_machine_can_compute_on() -> None:
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (torch.ones(3, device=device) * 2).sum().item() == 6


@pytest.mark.parametrize("name", ["cpu", " CPU "])
def test_cpu(name: str) -> None:
    assert resolve_device(name) == torch.device("cpu")


def test_without_cuda_auto_and_cuda_names_fall_back_to_cpu(no_cuda) -> None:
    for name in ("auto", "cuda", "cuda:0", "cuda:7"):
        assert resolve_device(name) == torch.device("cpu"), name


def test_the_cpu_fallback_is_logged_once_per_name(no_cuda, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="medattn.devices"):
        resolve_device("cuda")
        resolve_device("cuda")
        resolve_device("cuda:1")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "'cuda'" in messages[0] and "CPU" in messages[0]
    assert "'cuda:1'" in messages[1]


def test_auto_is_silent_without_cuda(no_cuda, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="medattn.devices"):
        resolve_device("auto")
    assert not caplog.records


def test_with_cuda_names_resolve_to_that_gpu(two_gpus) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_with_cuda_an_index_past_the_last_gpu_is_a_param_error(two_gpus) -> None:
    with pytest.raises(ParamError, match=r"'cuda:2'.*2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "mps0", "", "cpu:0"])
def test_unknown_names_are_param_errors_naming_the_value(name: str) -> None:
    with pytest.raises(ParamError) as caught:
        resolve_device(name)
    assert repr(name) in str(caught.value) and "\n" not in str(caught.value)


def test_a_non_string_is_a_param_error() -> None:
    with pytest.raises(ParamError, match="got 0"):
        resolve_device(0)  # type: ignore[arg-type]
