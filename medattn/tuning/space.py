"""The search space of ``params.yaml: tune.space`` and how a trial's values become fit()'s params.

The space is written with the names of the params it changes, nested like ``params.yaml``
(so ``dvc exp run -S tune.space.train.lambda_l1.high=0.5`` addresses one bound)::

    space:
      model:
        K: {choices: [32, 64, 128, 256]}                   # categorical
      train:
        lambda_l1: {low: 0.0001, high: 0.1, log: true}     # float, log-uniform
        cutoff_epoch: {low: 1, high: 8}                    # int, uniform
        weight_decay: {choices: [0.001, 0.0001, 0.00001]}

Any ``model.*`` or ``train.*`` key may be searched; the type of the bounds follows the type of
the param (an int param gets ``suggest_int``). Everything is checked when params are loaded,
so a typo in the space fails before a trial trains. Nothing here imports Optuna at module
level: config validation uses this module too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from medattn.errors import ParamError

if TYPE_CHECKING:
    import optuna

    from medattn.config import ModelParams, TrainParams

#: The objectives a study may have (``tune.objectives``); both are maximised, on the validation split.
OBJECTIVES = ("val_macro_f1", "attention_mass_ratio")
SECTIONS = ("model", "train")
# Never searched: where to compute, and what fixes the run (a search over seeds finds luck).
_NOT_SEARCHABLE = {"train.device", "train.fast_path", "train.seed", "train.epochs", "model.pretrained_weights"}

Value = Union[int, float, str, bool]


@dataclass(frozen=True)
class Dimension:
    """One searched param: ``choices`` (categorical) or ``low``..``high`` (``log``-uniform when set)."""

    name: str  # dotted: "train.lambda_l1"
    kind: type  # int, float or str (the param's type)
    choices: Optional[tuple[Value, ...]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False

    def suggest(self, trial: optuna.Trial) -> Value:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def suggest(self, trial: optuna.Trial) -> dict[str, Value]:
        """One value per dimension, drawn by the study's sampler (or the retried trial's own values)."""
        return {d.name: d.suggest(trial) for d in self.dimensions}


def _param_types(cls: type) -> dict[str, type]:
    hints = get_type_hints(cls)
    types: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if get_origin(hint) is Union:
            hint = next(a for a in get_args(hint) if a is not type(None))
        types[f.name] = hint
    return types


def parse_search_space(raw: Any, train: TrainParams, check_epochs: bool = True) -> SearchSpace:
    """Check ``tune.space`` against the params it names; a mistake is a one-line ParamError.

    ``check_epochs=False`` (params loading) leaves out the cut-off range vs ``train.epochs``:
    a small ``train.epochs`` for a quick train must not fail every stage over the search's
    range, only the search itself.
    """
    from medattn.config import ModelParams, TrainParams

    if not isinstance(raw, Mapping) or not raw:
        raise ParamError(f"params.yaml: tune.space must be a non-empty mapping of {' / '.join(SECTIONS)} keys, "
                         f"got {raw!r}")
    classes = {"model": ModelParams, "train": TrainParams}
    dims: list[Dimension] = []
    for section, entries in raw.items():
        if section not in classes:
            raise ParamError(f"params.yaml: tune.space.{section}: only {', '.join(SECTIONS)} params can be searched")
        if not isinstance(entries, Mapping):
            raise ParamError(f"params.yaml: tune.space.{section} must be a mapping of param names, got {entries!r}")
        types = _param_types(classes[section])
        for key, spec in entries.items():
            name = f"{section}.{key}"
            if key not in types:
                raise ParamError(f"params.yaml: tune.space.{name}: {section} has no param {key!r} "
                                 f"(known: {', '.join(sorted(types))})")
            if name in _NOT_SEARCHABLE:
                raise ParamError(f"params.yaml: tune.space.{name} cannot be searched (it fixes the run, not the model)")
            dims.append(_dimension(name, types[key], spec))
    space = SearchSpace(tuple(dims))
    if check_epochs:
        _check_cutoff(space, train)
    return space


def _dimension(name: str, kind: type, spec: Any) -> Dimension:
    where = f"params.yaml: tune.space.{name}"
    if not isinstance(spec, Mapping):
        raise ParamError(f"{where} must be {{choices: [...]}} or {{low: .., high: .., log: false}}, got {spec!r}")
    unknown = sorted(set(spec) - {"choices", "low", "high", "log"})
    if unknown:
        raise ParamError(f"{where}: unknown key {unknown[0]!r} (known: choices, high, log, low)")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ParamError(f"{where}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ParamError(f"{where}.choices must be a non-empty list, got {choices!r}")
        for value in choices:
            if not _fits(kind, value):
                raise ParamError(f"{where}.choices: {value!r} is not a valid {kind.__name__} for {name}")
        if len(set(map(repr, choices))) != len(choices):
            raise ParamError(f"{where}.choices holds a value twice: {choices!r}")
        return Dimension(name, kind, choices=tuple(float(v) if kind is float else v for v in choices))
    if kind not in (int, float):
        raise ParamError(f"{where}: {name} is a {kind.__name__}: give choices, not low/high")
    if "low" not in spec or "high" not in spec:
        raise ParamError(f"{where}: a range needs both low and high")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for bound, value in (("low", low), ("high", high)):
        if not _fits(kind, value):
            raise ParamError(f"{where}.{bound} must be a {kind.__name__}, got {value!r}")
    if not isinstance(log, bool):
        raise ParamError(f"{where}.log must be true or false, got {log!r}")
    if not low < high:
        raise ParamError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ParamError(f"{where}: a log range needs low > 0, got {low}")
    return Dimension(name, kind, low=low, high=high, log=log)


def _fits(kind: type, value: Any) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _check_cutoff(space: SearchSpace, train: TrainParams) -> None:
    for dim in space.dimensions:
        if dim.name != "train.cutoff_epoch":
            continue
        values = dim.choices if dim.choices is not None else (dim.low, dim.high)
        if min(values) < 0 or max(values) > train.epochs:
            raise ParamError("params.yaml: tune.space.train.cutoff_epoch must lie in "
                             f"[0, train.epochs={train.epochs}], got {list(values)}")


def apply_values(model: ModelParams, train: TrainParams,
                 values: Mapping[str, Value]) -> tuple[ModelParams, TrainParams]:
    """``model`` and ``train`` with a trial's values (``{"train.lambda_l1": 0.01}``) put in."""
    changes: dict[str, dict[str, Value]] = {"model": {}, "train": {}}
    for name, value in values.items():
        section, key = name.split(".", 1)
        changes[section][key] = value
    return dataclasses.replace(model, **changes["model"]), dataclasses.replace(train, **changes["train"])


def as_params_tree(values: Mapping[str, Value]) -> dict[str, dict[str, Value]]:
    """``{"model.K": 64}`` -> ``{"model": {"K": 64}}``: the shape of params.yaml."""
    tree: dict[str, dict[str, Value]] = {}
    for name, value in sorted(values.items()):
        section, key = name.split(".", 1)
        tree.setdefault(section, {})[key] = value
    return tree


def dvc_exp_run_command(values: Mapping[str, Value]) -> str:
    """The ``dvc exp run -S ...`` line that trains with these values."""
    return "dvc exp run " + " ".join(f"-S {name}={_yaml_scalar(value)}" for name, value in sorted(values.items()))


def _yaml_scalar(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
