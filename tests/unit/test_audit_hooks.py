"""Every champion move is audited: promote, rollback and the gate record who, when, from -> to, mirrored to MLflow;
an audit that fails undoes the move; refused moves (no challenger, no previous champion) record nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from medattn.errors import RegistryError
from medattn.feedback.audit import alias_change_recorder, list_events, record_feedback_event
from medattn.feedback.store import FeedbackStore
from medattn.models.bundle import save_bundle
from medattn.models.factory import ModelSpec, create_model
from medattn.registry import (
    CHALLENGER,
    CHAMPION,
    assign_challenger_and_gate,
    end_run,
    log_bundle_model,
    log_metrics,
    promote_challenger,
    rollback_champion,
    start_pipeline_run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "audited-model"


@pytest.fixture(autouse=True)
def no_uri_env(monkeypatch):
    for name in ("MEDATTN_TRACKING_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MEDATTN_FEEDBACK_DB"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}") as opened:
        yield opened


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    spec = ModelSpec(backbone="small_cnn", attention="none", num_classes=2, image_size=16, class_names=("a", "b"))
    return save_bundle(create_model(spec), spec, tmp_path / "bundle")


def _register(uri: str, bundle: Path, f1: float) -> str:
    run_id = start_pipeline_run({"data.source": "synthetic"}, "unit-audit", uri)
    log_metrics(run_id, {"test_macro_f1": f1}, uri)
    version = log_bundle_model(run_id, bundle, MODEL, tracking_uri=uri)
    end_run(run_id, uri)
    return version


def _state(uri: str) -> tuple[str, str, str, dict[str, str]]:
    """(champion, challenger, champion_history tag, every version's tags) - what a move changes."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registered = client.get_registered_model(MODEL)
    versions = client.search_model_versions(f"name='{MODEL}'")
    return (str(registered.aliases[CHAMPION]), str(registered.aliases.get(CHALLENGER)),
            registered.tags.get("champion_history", ""),
            {str(v.version): {k: t for k, t in v.tags.items() if not k.startswith("audit.")} for v in versions})


def _moves(store: FeedbackStore) -> list[tuple[str, str, str | None, str]]:
    return [(e.actor, e.action, e.from_version, e.to_version) for e in list_events(store)]


def test_promote_rollback_and_gate_record_who_from_and_to_mirrored_to_mlflow(uri, store, bundle) -> None:
    v1 = _register(uri, bundle, 0.8)
    gate = assign_challenger_and_gate(MODEL, v1, tracking_uri=uri,
                                      on_change=alias_change_recorder(store, "register-stage", uri))
    assert gate.promoted
    v2 = _register(uri, bundle, 0.5)
    assert not assign_challenger_and_gate(MODEL, v2, tracking_uri=uri,
                                          on_change=alias_change_recorder(store, "register-stage", uri)).promoted
    assert promote_challenger(MODEL, tracking_uri=uri, on_change=alias_change_recorder(store, "alice", uri)).version == v2
    # accepting again changes nothing, so nothing is recorded
    promote_challenger(MODEL, tracking_uri=uri, on_change=alias_change_recorder(store, "alice", uri))
    assert rollback_champion(MODEL, tracking_uri=uri, on_change=alias_change_recorder(store, "bob", uri)).version == v1
    assert _moves(store) == [("register-stage", "promote", None, v1), ("alice", "promote", v1, v2),
                             ("bob", "rollback", v2, v1)]
    events = list_events(store)
    assert all(e.model_name == MODEL and e.created_at.tzinfo is not None for e in events)
    assert [e.id for e in list_events(store, action="rollback")] == [events[2].id]
    assert list_events(store, model_name="another-model") == []
    assert [e.id for e in list_events(store, since=events[1].created_at)] == [events[1].id, events[2].id]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v2_tags = client.get_model_version(MODEL, v2).tags
    assert (v2_tags["audit.promote.by"], v2_tags["audit.promote.from_version"]) == ("alice", v1)
    assert v2_tags["audit.promote.event_id"] == str(events[1].id)
    v1_tags = client.get_model_version(MODEL, v1).tags
    assert (v1_tags["audit.rollback.by"], v1_tags["audit.rollback.from_version"]) == ("bob", v2)


def test_an_audit_that_fails_undoes_the_move(uri, store, bundle) -> None:
    v1 = _register(uri, bundle, 0.8)
    assert assign_challenger_and_gate(MODEL, v1, tracking_uri=uri).promoted
    v2 = _register(uri, bundle, 0.5)
    assign_challenger_and_gate(MODEL, v2, tracking_uri=uri)
    before = _state(uri)

    def broken_audit(change) -> None:
        assert change.action in ("promote", "rollback")
        raise OSError("audit database is read-only")

    with pytest.raises(OSError, match="read-only"):
        promote_challenger(MODEL, tracking_uri=uri, on_change=broken_audit)
    assert _state(uri) == before  # champion, history and rolled_back tags as they were

    promote_challenger(MODEL, tracking_uri=uri)  # v2 champion, v1 before it
    before = _state(uri)
    with pytest.raises(OSError, match="read-only"):
        rollback_champion(MODEL, tracking_uri=uri, on_change=broken_audit)
    assert _state(uri) == before
    assert "rolled_back" not in before[3][v2] and _state(uri)[0] == v2


def test_refused_moves_record_nothing(uri, store, bundle) -> None:
    v1 = _register(uri, bundle, 0.8)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias(MODEL, CHAMPION, v1)  # a champion, but no challenger, no history
    with pytest.raises(RegistryError, match="no alias 'challenger'"):
        promote_challenger(MODEL, tracking_uri=uri, on_change=alias_change_recorder(store, "alice", uri))
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback_champion(MODEL, tracking_uri=uri, on_change=alias_change_recorder(store, "alice", uri))
    assert list_events(store) == []
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == v1

    # a champion set by hand (not in champion_history) can still be rolled back to after an Accept
    v2 = _register(uri, bundle, 0.5)
    client.set_registered_model_alias(MODEL, CHALLENGER, v2)
    promote_challenger(MODEL, tracking_uri=uri, on_change=alias_change_recorder(store, "alice", uri))
    assert rollback_champion(MODEL, tracking_uri=uri, on_change=alias_change_recorder(store, "alice", uri)).version == v1
    assert _moves(store) == [("alice", "promote", v1, v2), ("alice", "rollback", v2, v1)]


def test_a_replayed_feedback_gets_one_audit_row(store) -> None:
    from medattn.feedback.schema import parse_submission

    submission = parse_submission(json.dumps({
        "model_name": MODEL, "model_version": "1", "expert_id": "carol",
        "rois": [{"kind": "relevant", "shape": "rectangle", "x": 1, "y": 1, "width": 4, "height": 4}]}).encode(), 10**6)
    record, created = store.add_feedback(submission, "ab" * 32, 16, 16, "key-1", caller="carol")
    assert created
    first = record_feedback_event(store, "carol", record)
    again = record_feedback_event(store, "carol", record)
    assert again.id == first.id and len(list_events(store, action="feedback")) == 1
    assert (first.actor, first.to_version, first.details["feedback_id"]) == ("carol", "1", str(record.id))


def test_cli_promote_is_audited_with_the_actor(uri, tmp_path, bundle) -> None:
    v1 = _register(uri, bundle, 0.8)
    assert assign_challenger_and_gate(MODEL, v1, tracking_uri=uri).promoted
    v2 = _register(uri, bundle, 0.5)
    assign_challenger_and_gate(MODEL, v2, tracking_uri=uri)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"model_name": MODEL}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDATTN_", "MLFLOW_"))}
    env.update(MEDATTN_TRACKING_URI=uri, MEDATTN_STATE_DIR=str(tmp_path / "state"))

    def medattn(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medattn.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    # one CLI run (each one imports MLflow: seconds); rollback shares its code path (_audited_move)
    promoted = medattn("model", "promote", "--actor", "dr-who")
    assert promoted.returncode == 0, promoted.stderr
    assert f"champion is now version {v2}" in promoted.stdout
    with FeedbackStore(f"sqlite:///{tmp_path / 'state' / 'feedback.db'}") as store:
        assert _moves(store) == [("dr-who", "promote", v1, v2)]


def test_a_feedback_whose_audit_row_fails_is_a_503_that_names_the_stored_record() -> None:
    from types import SimpleNamespace

    from medattn.feedback.schema import StoreUnavailable
    from medattn.serving.backend import HttpProblem
    from serving.routers.feedback import _audit

    class DownStore:
        safe_url = "sqlite:///down-for-this-test.db"

        def _transaction(self, write: bool = False):
            raise StoreUnavailable("feedback store unreachable: disk I/O error")

    record = SimpleNamespace(id="1234", model_version="1", model_name=MODEL, request_id=None, expert_id="e", rois=[])
    with pytest.raises(HttpProblem) as failed:
        _audit(SimpleNamespace(store=DownStore()), "expert", record)
    assert failed.value.status_code == 503
    assert "feedback 1234 is stored" in str(failed.value) and "same Idempotency-Key" in str(failed.value)
