"""Service settings: defaults without setup, variables over the file, clear errors for bad values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medattn.errors import ParamError
from medattn.serving.settings import ServingSettings, inference_mode_from_env


@pytest.fixture(autouse=True)
def no_uri_env(monkeypatch):
    # resolve_tracking_uri reads these from the real environment first.
    for name in ("MEDATTN_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / ".git").mkdir()
    (tmp_path / "params.yaml").write_text("mlflow:\n  model_name: from-params\n")
    return tmp_path


def test_defaults_live_under_the_repo_state_dir(repo):
    settings = ServingSettings.from_env({}, repo_root=repo)
    assert settings.model_name == "from-params"
    assert settings.tracking_uri == f"sqlite:///{repo}/mlflow.db"
    assert settings.state_dir == repo / ".medattn"
    assert settings.feedback_db == f"sqlite:///{repo}/.medattn/feedback.db"
    assert settings.blob_dir == repo / ".medattn" / "blobs"
    assert settings.poll_seconds == 30.0 and settings.open_predict is False


def test_variables_override_the_settings_file(repo):
    config = repo / "serving.yaml"
    config.write_text("poll_seconds: 5\nmodel_name: from-file\nmax_upload_bytes: 1000\n")
    settings = ServingSettings.from_env({
        "MEDATTN_SERVING_CONFIG": str(config), "MEDATTN_POLL_SECONDS": "0", "MEDATTN_OPEN_PREDICT": "yes",
        "MEDATTN_TRACKING_URI": "sqlite:///rel.db", "MEDATTN_STATE_DIR": "state",
    }, repo_root=repo)
    assert settings.model_name == "from-file" and settings.max_upload_bytes == 1000
    assert settings.poll_seconds == 0.0 and settings.open_predict is True
    assert settings.state_dir == repo / "state" and settings.blob_dir == repo / "state" / "blobs"


@pytest.mark.parametrize("variable, value, words", [
    ("MEDATTN_POLL_SECONDS", "soon", "a number"),
    ("MEDATTN_MAX_UPLOAD_BYTES", "0", ">= 1"),
    ("MEDATTN_OPEN_PREDICT", "maybe", "true or false"),
    ("MEDATTN_DEVICE", "tpu", "cpu, cuda"),
    ("MEDATTN_DEVICE", "cuda:x", "'cuda:x'"),
    ("MEDATTN_INFERENCE", "gpu", "auto, in_process, runner"),
    ("MEDATTN_IN_PROCESS_MAX_MS", "-1", ">= 0"),
])
def test_a_bad_variable_is_named_in_the_error(repo, variable, value, words):
    with pytest.raises(ParamError, match=variable) as info:
        ServingSettings.from_env({variable: value}, repo_root=repo)
    assert words in str(info.value)


def test_unknown_key_in_the_settings_file_is_refused(repo):
    config = repo / "serving.yaml"
    config.write_text("pol_seconds: 5\n")
    with pytest.raises(ParamError, match="pol_seconds"):
        ServingSettings.from_env({"MEDATTN_SERVING_CONFIG": str(config)}, repo_root=repo)


def test_a_cuda_device_without_cuda_is_accepted_and_served_on_the_cpu(repo, monkeypatch):
    import torch

    from medattn.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = ServingSettings.from_env({"MEDATTN_DEVICE": "cuda:1"}, repo_root=repo)
    assert settings.device == "cuda:1"
    assert resolve_device(settings.device) == torch.device("cpu")


def test_memory_limits_and_upload_policy_have_defaults_and_reach_the_image_limits(repo):
    defaults = ServingSettings.from_env({}, repo_root=repo)
    assert (defaults.max_decoded_bytes, defaults.max_batch_decoded_bytes) == (2**30, 2**31)
    assert defaults.max_frame_pixels == 4096 * 4096 and defaults.max_aspect_ratio == 4.0
    assert defaults.stored_upload == "reencoded" and defaults.strip_metadata is True
    assert defaults.upload_retention_hours == 720.0 and defaults.max_feedback_mask_pixels == 8192 * 8192
    settings = ServingSettings.from_env({
        "MEDATTN_MAX_DECODED_BYTES": "1_000", "MEDATTN_MAX_FRAME_PIXELS": "500", "MEDATTN_MAX_ASPECT_RATIO": "2.5",
        "MEDATTN_STORED_UPLOAD": "Original", "MEDATTN_STRIP_METADATA": "no", "MEDATTN_UPLOAD_RETENTION_HOURS": "0",
    }, repo_root=repo)
    limits = settings.image_limits
    assert (limits.max_decoded_bytes, limits.max_frame_pixels, limits.max_aspect_ratio) == (1000, 500, 2.5)
    assert settings.stored_upload == "original" and settings.strip_metadata is False
    assert settings.upload_retention_hours == 0.0


@pytest.mark.parametrize("variable, value, words", [
    ("MEDATTN_STORED_UPLOAD", "everything", "reencoded, original"),
    ("MEDATTN_MAX_ASPECT_RATIO", "0.5", ">= 1"),
    ("MEDATTN_UPLOAD_RETENTION_HOURS", "-1", ">= 0"),
    ("MEDATTN_MAX_BATCH_DECODED_BYTES", "lots", "an integer"),
])
def test_a_bad_limit_or_policy_is_named_in_the_error(repo, variable, value, words):
    with pytest.raises(ParamError, match=variable) as info:
        ServingSettings.from_env({variable: value}, repo_root=repo)
    assert words in str(info.value)


def test_inference_mode_defaults_to_auto_and_the_variable_wins_over_the_file(repo):
    assert ServingSettings.from_env({}, repo_root=repo).inference == "auto"
    config = repo / "serving.yaml"
    config.write_text("inference: runner\nin_process_max_ms: 25\n")
    from_file = {"MEDATTN_SERVING_CONFIG": str(config)}
    settings = ServingSettings.from_env(from_file, repo_root=repo)
    assert settings.inference == "runner" and settings.in_process_max_ms == 25.0
    # The service reads the mode alone at import; it must agree with the full settings.
    assert inference_mode_from_env(from_file) == "runner"
    assert inference_mode_from_env({**from_file, "MEDATTN_INFERENCE": "In-Process"}) == "in_process"
    assert inference_mode_from_env({}) == "auto"
    with pytest.raises(ParamError, match="MEDATTN_INFERENCE"):
        inference_mode_from_env({"MEDATTN_INFERENCE": "sometimes"})


def test_api_workers_default_to_one_per_core_up_to_four_and_bad_values_are_refused(monkeypatch) -> None:
    from medattn.serving.settings import MAX_DEFAULT_API_WORKERS, api_workers_from_env

    for cores, want in ((1, 1), (2, 2), (16, MAX_DEFAULT_API_WORKERS)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert api_workers_from_env({}) == want
    assert api_workers_from_env({"MEDATTN_API_WORKERS": " 3 "}) == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ParamError, match="MEDATTN_API_WORKERS"):
            api_workers_from_env({"MEDATTN_API_WORKERS": bad})
