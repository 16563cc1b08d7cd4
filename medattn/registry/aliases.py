"""The champion/challenger lifecycle: gate a new version, promote it, roll back.

``challenger`` is the newest candidate, ``champion`` is what the HTTP service serves. Every
change of champion is appended to the registered-model tag ``champion_history`` (a JSON list
of versions), so a rollback knows where to go even after several promotions.

Every function here that moves an alias holds :func:`~medattn.registry.alias_lock.alias_lock`
for the whole read-modify-write, so after any interleaving of callers (HTTP, CLI, the register
stage, recalibration) the invariants hold: the last entry of ``champion_history`` is the
``champion`` alias, the champion carries no ``rolled_back`` tag, and what a call returns is
the champion it left behind.

Audit (``on_change``): each function that can change the champion takes an optional callback,
called with an :class:`AliasChange` *inside* the alias lock, right after the MLflow calls, when
the champion actually moved. The order is deliberate: the alias is moved first and the callback
(``medattn.feedback.audit.alias_change_recorder``: append the audit row, mirror it to MLflow)
second, so an audit row always describes a change that happened; if the callback raises, the
change is undone (champion alias, ``champion_history`` and ``rolled_back`` tags put back as they
were read under the same lock) and the error re-raised, so a failed audit never leaves a promote
or rollback half-done or unrecorded. Recording first instead would leave, on an MLflow failure, an
append-only row claiming a promotion that never took place. Only a process killed in the few
milliseconds between the alias move and the row's commit can leave a move without its row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from medattn.errors import RegistryError, first_line
from medattn.registry._mlflow import client_for, mlflow_errors
from medattn.registry.alias_lock import alias_lock
from medattn.registry.location import resolve_tracking_uri
from medattn.registry.lookup import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_METRIC,
    ModelVersionInfo,
    alias_or_none,
    describe,
    get_alias,
    get_version,
    metric_of,
    version_number,
    version_or_none,
)

HISTORY_TAG = "champion_history"
ROLLED_BACK_TAG = "rolled_back"
_HISTORY_KEEP = 100  # entries; plenty for rollbacks, far below MLflow's tag size limit


@dataclass(frozen=True)
class AliasChange:
    """One move of the champion alias, as the audit log records it."""

    model_name: str
    action: str  # "promote" or "rollback" (medattn.feedback.audit's action names)
    from_version: Optional[str]
    to_version: str
    details: dict[str, Any] = field(default_factory=dict)


OnAliasChange = Callable[[AliasChange], None]


@dataclass(frozen=True)
class _AliasSnapshot:
    """What a champion move changes, read under the lock before it, so a failed audit can undo it."""

    champion: Optional[str]
    history_raw: Optional[str]
    rolled_back: dict[str, Optional[str]]  # version -> its rolled_back tag (None: not set)


def _snapshot(client, name: str, versions: list[str]) -> _AliasSnapshot:
    champion = alias_or_none(client, name, CHAMPION)
    return _AliasSnapshot(
        champion=version_number(champion) if champion else None,
        history_raw=client.get_registered_model(name).tags.get(HISTORY_TAG),
        rolled_back={v: (client.get_model_version(name, v).tags or {}).get(ROLLED_BACK_TAG) for v in versions})


def _restore(client, name: str, snap: _AliasSnapshot) -> None:
    """Put back what :func:`_snapshot` read (the caller holds the alias lock)."""
    if snap.champion is None:
        client.delete_registered_model_alias(name, CHAMPION)
    else:
        client.set_registered_model_alias(name, CHAMPION, snap.champion)
    if snap.history_raw is None:
        client.delete_registered_model_tag(name, HISTORY_TAG)
    else:
        client.set_registered_model_tag(name, HISTORY_TAG, snap.history_raw)
    for version, value in snap.rolled_back.items():
        present = ROLLED_BACK_TAG in (client.get_model_version(name, version).tags or {})
        if value is None and present:
            client.delete_model_version_tag(name, version, ROLLED_BACK_TAG)
        elif value is not None:
            client.set_model_version_tag(name, version, ROLLED_BACK_TAG, value)


def _notify(client, name: str, snap: Optional[_AliasSnapshot], on_change: Optional[OnAliasChange],
            change: AliasChange) -> None:
    """Run the audit callback; on failure undo the move (see the module docstring) and re-raise."""
    if on_change is None or snap is None:
        return
    try:
        on_change(change)
    except BaseException as exc:
        try:
            _restore(client, name, snap)
        except Exception as undo:  # noqa: BLE001 - the audit failure is the one to report
            raise RegistryError(f"registry: the {change.action} of {name!r} to version {change.to_version} could "
                                f"not be audited ({first_line(exc)}) nor undone ({first_line(undo)}); check the "
                                "champion alias") from exc
        raise


@dataclass(frozen=True)
class GateDecision:
    """What :func:`assign_challenger_and_gate` did, and why (the register stage writes it as JSON)."""

    model_name: str
    version: str
    promoted: bool
    reason: str
    metric_key: str
    higher_is_better: bool
    metric: float | None
    champion_before: str | None
    champion_metric: float | None
    champion_after: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def assign_challenger_and_gate(
    model_name: str,
    version: str,
    metric_key: str = DEFAULT_METRIC,
    higher_is_better: bool = True,
    *,
    tracking_uri: str | None = None,
    on_change: Optional[OnAliasChange] = None,
) -> GateDecision:
    """Alias ``version`` as challenger; make it champion unless it is worse than the champion.

    "Worse" compares ``metric_key`` (from the version tag, else its run's metric). A missing
    champion means promotion; a challenger without the metric stays challenger; a champion
    without the metric (logged before gating existed) is replaced by a measured challenger.
    """
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with alias_lock(uri, model_name), mlflow_errors(uri):
        candidate = get_version(client, model_name, str(version))
        number = version_number(candidate)
        champion = alias_or_none(client, model_name, CHAMPION)
        client.set_registered_model_alias(model_name, CHALLENGER, number)
        metric = metric_of(client, candidate, metric_key)
        champion_metric = metric_of(client, champion, metric_key) if champion else None
        champion_before = version_number(champion) if champion else None
        promoted, reason = _judge(number, metric, champion_before, champion_metric, metric_key, higher_is_better)
        if promoted and champion_before != number:
            snap = _snapshot(client, model_name, [number]) if on_change else None
            _set_champion(client, model_name, number)
            _notify(client, model_name, snap, on_change,
                    AliasChange(model_name, "promote", champion_before, number, {"gate": reason}))
        client.set_model_version_tag(model_name, number, "gate_reason", reason)
    return GateDecision(
        model_name=model_name, version=number, promoted=promoted, reason=reason,
        metric_key=metric_key, higher_is_better=higher_is_better, metric=metric,
        champion_before=champion_before, champion_metric=champion_metric,
        champion_after=number if promoted else champion_before,
    )


def promote_challenger(model_name: str, *, tracking_uri: str | None = None,
                       on_change: Optional[OnAliasChange] = None) -> ModelVersionInfo:
    """Make the challenger champion unconditionally (an expert accepted it).

    A challenger that already is champion changes nothing (and ``on_change`` is not called).
    """
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with alias_lock(uri, model_name), mlflow_errors(uri):
        challenger = version_number(get_alias(client, model_name, CHALLENGER))
        champion = alias_or_none(client, model_name, CHAMPION)
        if champion is None or version_number(champion) != challenger:
            snap = _snapshot(client, model_name, [challenger]) if on_change else None
            _set_champion(client, model_name, challenger)
            _notify(client, model_name, snap, on_change,
                    AliasChange(model_name, "promote", version_number(champion) if champion else None, challenger))
        return describe(client, get_version(client, model_name, challenger), DEFAULT_METRIC)


def rollback_champion(model_name: str, *, tracking_uri: str | None = None,
                      on_change: Optional[OnAliasChange] = None) -> ModelVersionInfo:
    """Point champion back at the champion before the current one (per ``champion_history``)."""
    uri = tracking_uri or resolve_tracking_uri()
    client = client_for(uri)
    with alias_lock(uri, model_name), mlflow_errors(uri):
        current = version_number(get_alias(client, model_name, CHAMPION))
        history = champion_history(client, model_name)
        while history and history[-1] == current:
            history.pop()
        while history and version_or_none(client, model_name, history[-1]) is None:
            history.pop()  # deleted since it was champion
        if not history:
            raise RegistryError(
                f"registry: model {model_name!r} has no previous champion to roll back to "
                f"(champion is version {current})"
            )
        previous = history[-1]
        snap = _snapshot(client, model_name, [current, previous]) if on_change else None
        client.set_registered_model_alias(model_name, CHAMPION, previous)
        client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
        client.set_model_version_tag(model_name, current, ROLLED_BACK_TAG, "true")
        _clear_rolled_back(client, model_name, previous)
        _notify(client, model_name, snap, on_change, AliasChange(model_name, "rollback", current, previous))
        return describe(client, get_version(client, model_name, previous), DEFAULT_METRIC)


def champion_history(client, name: str) -> list[str]:
    """Versions that were champion, oldest first (the current champion last)."""
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    try:
        history = json.loads(raw) if raw else []
    except ValueError:
        history = []  # hand-edited tag: start over rather than block promotions
    return [str(v) for v in history] if isinstance(history, list) else []


def _judge(
    version: str, metric: float | None, champion: str | None, champion_metric: float | None,
    key: str, higher_is_better: bool,
) -> tuple[bool, str]:
    """(promote?, the reason in one line)."""
    if champion is None:
        return True, f"no champion yet: version {version} becomes champion"
    if champion == version:
        return True, f"version {version} is already champion"
    if metric is None:
        return False, f"version {version} has no {key}: champion stays version {champion}"
    if champion_metric is None:
        return True, f"champion version {champion} has no {key}: version {version} ({metric:.4f}) replaces it"
    not_worse = metric >= champion_metric if higher_is_better else metric <= champion_metric
    if not_worse:
        relation, outcome = (">=" if higher_is_better else "<="), f"version {version} becomes champion"
    else:
        relation, outcome = ("<" if higher_is_better else ">"), f"champion stays version {champion}"
    return not_worse, f"{key} {metric:.4f} {relation} champion's {champion_metric:.4f}: {outcome}"


def _set_champion(client, name: str, version: str) -> None:
    """Make ``version`` champion; the caller holds the alias lock.

    A champion the history does not end with (its alias set by hand in MLflow, or before the
    history existed) is appended first, so the promotion can be rolled back to it.
    """
    history = champion_history(client, name)
    current = alias_or_none(client, name, CHAMPION)
    if current is not None and (not history or history[-1] != version_number(current)):
        history.append(version_number(current))
    history = [*history, version][-_HISTORY_KEEP:]
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    _clear_rolled_back(client, name, version)


def _clear_rolled_back(client, name: str, version: str) -> None:
    """A version that is champion again (promoted anew, or rolled back to) is not "rolled back"."""
    if ROLLED_BACK_TAG in (client.get_model_version(name, version).tags or {}):
        client.delete_model_version_tag(name, version, ROLLED_BACK_TAG)
