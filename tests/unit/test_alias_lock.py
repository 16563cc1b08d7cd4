"""The alias lock: it serialises holders, survives a SIGKILLed holder, bounds the wait; promote/rollback
under 20 concurrent callers leave aliases, history and tags consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medattn.errors import RegistryError
from medattn.registry import (
    CHAMPION,
    assign_challenger_and_gate,
    end_run,
    log_bundle_model,
    log_metrics,
    promote_challenger,
    rollback_champion,
    start_pipeline_run,
)
from medattn.registry.alias_lock import alias_lock, lock_file_for

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_uri_env(monkeypatch):
    for name in ("MEDATTN_TRACKING_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


def _hold_in_child(uri: str, model: str, then: str) -> subprocess.Popen:
    """A process that takes the lock, prints 'held', then sleeps or SIGKILLs itself."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from medattn.registry.alias_lock import alias_lock
        with alias_lock({uri!r}, {model!r}):
            print("held", flush=True)
            {"os.kill(os.getpid(), signal.SIGKILL)" if then == "die" else "time.sleep(30)"}
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert child.stdout.readline().strip() == "held"
    return child


def test_lock_file_lies_beside_a_sqlite_database_and_elsewhere_for_servers(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert lock_file_for(uri, "m").parent == tmp_path
    assert lock_file_for(uri, "m") != lock_file_for(uri, "other")
    monkeypatch.setenv("MEDATTN_ALIAS_LOCK_DIR", str(tmp_path / "locks"))
    assert lock_file_for("http://mlflow.internal:5000", "m").parent == tmp_path / "locks"


def test_holders_never_overlap(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    inside, overlaps = [0], []
    guard = threading.Lock()

    def hold() -> None:
        with alias_lock(uri, "m"):
            with guard:
                inside[0] += 1
                overlaps.append(inside[0])
            time.sleep(0.01)
            with guard:
                inside[0] -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: hold(), range(40)))
    assert len(overlaps) == 40 and max(overlaps) == 1


def test_a_sigkilled_holder_does_not_block_the_next_caller(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = _hold_in_child(uri, "m", then="die")
    assert child.wait(timeout=30) == -9
    with alias_lock(uri, "m", timeout_s=5):
        pass


def test_waiting_is_bounded_with_a_one_line_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = _hold_in_child(uri, "m", then="sleep")
    try:
        with pytest.raises(RegistryError, match="held the alias lock for over 0.3 s; retry"):
            with alias_lock(uri, "m", timeout_s=0.3):
                pass
        with alias_lock(uri, "another-model", timeout_s=1):  # other models are not blocked
            pass
    finally:
        child.kill()
        child.wait()


def _register(uri: str, bundle: Path, model: str, f1: float) -> str:
    run_id = start_pipeline_run({"data.source": "synthetic"}, "unit-alias-lock", uri)
    log_metrics(run_id, {"test_macro_f1": f1}, uri)
    version = log_bundle_model(run_id, bundle, model, tracking_uri=uri)
    end_run(run_id, uri)
    return version


def registry_state(uri: str, model: str) -> tuple[str, list[str], dict[str, bool]]:
    """(champion, champion_history, rolled_back per version)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registered = client.get_registered_model(model)
    champion = str(client.get_model_version_by_alias(model, CHAMPION).version)
    history = json.loads(registered.tags.get("champion_history", "[]"))
    versions = client.search_model_versions(f"name='{model}'")
    return champion, history, {str(v.version): v.tags.get("rolled_back") == "true" for v in versions}


def assert_consistent(uri: str, model: str) -> None:
    champion, history, rolled_back = registry_state(uri, model)
    assert history and history[-1] == champion, (champion, history)
    assert not rolled_back[champion], (champion, rolled_back)
    assert all(a != b for a, b in zip(history, history[1:], strict=False)), history  # no stutter from a lost update


def test_concurrent_promotes_and_rollbacks_stay_consistent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = "race-model"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.pt").write_bytes(b"\x00weights")
    (bundle / "model_spec.json").write_text(json.dumps({"backbone": "small_cnn"}))
    assert assign_challenger_and_gate(model, _register(uri, bundle, model, 0.5), tracking_uri=uri).promoted
    v2 = _register(uri, bundle, model, 0.4)
    assert not assign_challenger_and_gate(model, v2, tracking_uri=uri).promoted  # challenger 2, champion 1

    def act(i: int) -> str:
        action = promote_challenger if i % 2 == 0 else rollback_champion
        try:
            info = action(model, tracking_uri=uri)
        except RegistryError as exc:
            assert "no previous champion" in str(exc)  # a rollback while 1 is champion: refused
            return "refused"
        assert CHAMPION in info.aliases, info  # the answer describes the champion it left
        return info.version

    with ThreadPoolExecutor(20) as pool:  # (CLI processes join in tests/e2e/test_service_hostile.py)
        outcomes = list(pool.map(act, range(20)))
    assert set(outcomes) <= {"1", "2", "refused"} and {"2"} <= set(outcomes), outcomes
    assert_consistent(uri, model)
    # One more of each, in order, is exact.
    assert promote_challenger(model, tracking_uri=uri).version == "2"
    assert rollback_champion(model, tracking_uri=uri).version == "1"
    champion, _, rolled_back = registry_state(uri, model)
    assert (champion, rolled_back) == ("1", {"1": False, "2": True})
    assert_consistent(uri, model)
