"""Typed view of ``params.yaml``.

Every stage reads its slice through :func:`load_params`, so a wrong value fails in one place
with a message naming the key (``params.yaml: train.cutoff_epoch must be <= train.epochs``),
before any output is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml

from medattn.errors import ParamError

#: ``train.fast_path`` values (their meaning: medattn.training.fast_path)
FAST_PATH_CHOICES = ("auto", "on", "off", "compile")
DATA_SOURCES = ("synthetic", "imagefolder", "idrid", "jaffe", "malaria")
IDRID_TASKS = ("retinopathy", "macular_edema")
SYNTHETIC_PRESETS = ("easy", "benchmark")


@dataclass(frozen=True)
class SyntheticParams:
    # easy: every method aces it (fast tests); benchmark: the demo's calibrated, harder set
    preset: str = "easy"
    n_images: int = 720
    seed: int = 2024
    train_fraction: float = 0.6
    val_fraction: float = 0.15
    decoy_probability: float = 0.0
    # side of the decoy square as a share of the image side (how salient the shortcut is)
    decoy_size: float = 0.07


@dataclass(frozen=True)
class DataParams:
    source: str = "synthetic"
    root: Optional[str] = None
    idrid_task: str = "retinopathy"
    image_size: int = 96
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 13
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


@dataclass(frozen=True)
class ValidateParams:
    min_class_ratio: float = 0.3
    expected_channels: int = 3


@dataclass(frozen=True)
class ModelParams:
    backbone: str = "small_cnn"
    attention: str = "global_pixel"
    K: int = 32
    # 0: seed 001's pixel representation P as is; R > 0: P compressed to its top-R channel subspace
    pixel_rank: int = 0
    pretrained_weights: Optional[str] = None


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 15
    cutoff_epoch: int = 8
    lambda_l1: float = 0.1
    lr: float = 0.002
    batch_size: int = 32
    weight_decay: float = 0.0001
    seed: int = 0
    device: str = "auto"
    # auto = on where training runs on CUDA, off on the CPU; on | off | compile (medattn.training.fast_path)
    fast_path: str = "auto"


@dataclass(frozen=True)
class EvaluateParams:
    overlay_count: int = 8
    topk_percent: float = 5.0


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: Optional[str] = None
    experiment: str = "medattn"
    model_name: str = "medattn-fundus"


def _default_search_space() -> dict[str, Any]:
    # seed 001's search (K, lambda, weight decay) plus the cut-off epoch E; see params.yaml
    return {
        "model": {"K": {"choices": [32, 64, 128, 256]}},
        "train": {
            "lambda_l1": {"low": 1e-4, "high": 1e-1, "log": True},
            "cutoff_epoch": {"low": 1, "high": 8},
            "weight_decay": {"choices": [1e-3, 1e-4, 1e-5]},
        },
    }


@dataclass(frozen=True)
class PrunerParams:
    # Optuna's MedianPruner: no pruning before this many trials finished / epochs reported
    n_startup_trials: int = 2
    n_warmup_steps: int = 1


@dataclass(frozen=True)
class TuneParams:
    """The hyper-parameter search (``medattn.tuning``): what to search and where the study lives."""

    n_trials: int = 20
    seed: int = 0
    workers: int = 1
    # null: medattn-<hash of data and fixed params>, so changed params start a fresh study
    study_name: Optional[str] = None
    # null: a journal file under checkpoints/tune; an RDB URL (postgresql+psycopg://...) for many hosts
    storage: Optional[str] = None
    # val_macro_f1, optionally attention_mass_ratio (a second objective: a Pareto front)
    objectives: list[str] = field(default_factory=lambda: ["val_macro_f1"])
    pruner: PrunerParams = field(default_factory=PrunerParams)
    heartbeat_seconds: int = 30
    grace_seconds: int = 120
    max_retry: int = 2
    space: dict[str, Any] = field(default_factory=_default_search_space)


@dataclass(frozen=True)
class RecalibrateParams:
    """Expert-feedback recalibration (seed 002): the feedback loss, the gate, the schedule."""

    # weight of the distance between the model's map and the experts' target, where they drew
    gamma: float = 5.0
    # l2 | l1 | bce
    distance: str = "l2"
    # the challenger is eligible when test macro-F1 >= champion's - tolerance and ROI agreement is better
    tolerance: float = 0.02
    # the scheduler retrains once this many new feedback records wait ...
    min_feedback: int = 10
    # ... or once this many hours passed since the last retrain with any new feedback
    interval_hours: float = 24.0
    # promote an eligible challenger to champion without an expert's Accept
    auto_promote: bool = False
    epochs: int = 5
    lr: float = 0.001
    # share of the feedback records held out of training to measure ROI agreement on
    holdout_fraction: float = 0.2
    # feedback images per training step (rotating through all of them)
    feedback_batch_size: int = 16
    # also train on each feedback image with its irrelevant regions taken from another training
    # image (same place, same label): the experts said those pixels do not decide the class
    counterfactual: bool = True


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    recalibrate: RecalibrateParams = field(default_factory=RecalibrateParams)
    tune: TuneParams = field(default_factory=TuneParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.002, ...}``: the shape MLflow params and DVC ``-S`` use."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def _coerce(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking key names and scalar types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(f"params.yaml: {where or 'top level'} must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ParamError(f"params.yaml: unknown key {key!r} (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce_value(hints[name], raw[name], key)
    return cls(**kwargs)


def _coerce_value(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _coerce(hint, value, key)
    optional = get_origin(hint) is not None and type(None) in get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(f"params.yaml: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"params.yaml: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"params.yaml: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(f"params.yaml: {key} must be a string, got {value!r}")
        return value
    return value


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ParamError(f"params.yaml: {message}")


def validate_params(p: Params) -> Params:
    """Range and cross-field checks; returns ``p`` unchanged when everything is valid."""
    # late: keeps config import light; the registries are the one list of methods and backbones
    from medattn.models.factory import available_attentions, available_backbones

    d, s = p.data, p.data.synthetic
    _check(d.source in DATA_SOURCES, f"data.source must be one of {', '.join(DATA_SOURCES)}, got {d.source!r}")
    _check(d.source == "synthetic" or bool(d.root), f"data.root is required when data.source is {d.source!r}")
    _check(d.idrid_task in IDRID_TASKS,
           f"data.idrid_task must be one of {', '.join(IDRID_TASKS)}, got {d.idrid_task!r}")
    _check(16 <= d.image_size <= 1024, f"data.image_size must be in [16, 1024], got {d.image_size}")
    _check(0 < d.val_fraction < 1 and 0 < d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1,
           "data.val_fraction and data.test_fraction must be in (0, 1) and sum below 1")
    _check(s.preset in SYNTHETIC_PRESETS,
           f"data.synthetic.preset must be one of {', '.join(SYNTHETIC_PRESETS)}, got {s.preset!r}")
    _check(s.n_images >= 12, f"data.synthetic.n_images must be >= 12, got {s.n_images}")
    _check(0 < s.train_fraction < 1 and 0 < s.val_fraction < 1 and s.train_fraction + s.val_fraction < 1,
           "data.synthetic.train_fraction and val_fraction must be in (0, 1) and sum below 1")
    _check(0.0 <= s.decoy_probability <= 1.0,
           f"data.synthetic.decoy_probability must be in [0, 1], got {s.decoy_probability}")
    _check(0.0 < s.decoy_size <= 0.12,  # larger would reach into the fundus circle
           f"data.synthetic.decoy_size must be in (0, 0.12], got {s.decoy_size}")
    _check(0.0 < p.validate.min_class_ratio <= 1.0, "validate.min_class_ratio must be in (0, 1]")
    _check(p.validate.expected_channels in (1, 3), "validate.expected_channels must be 1 or 3")
    m = p.model
    backbones = available_backbones()
    _check(m.backbone in backbones, f"model.backbone {m.backbone!r} is unknown (choose from {', '.join(backbones)})")
    attentions = available_attentions()
    _check(m.attention in attentions, f"model.attention must be one of {', '.join(attentions)}, got {m.attention!r}")
    _check(1 <= m.K <= 4096, f"model.K must be in [1, 4096], got {m.K}")
    _check(m.pixel_rank >= 0, f"model.pixel_rank must be >= 0 (0 = uncompressed), got {m.pixel_rank}")
    if m.pretrained_weights is not None:
        _check(m.backbone != "small_cnn",
               "model.pretrained_weights must be null for small_cnn (it has no ImageNet weights)")
        _check(Path(m.pretrained_weights).is_file(),
               f"model.pretrained_weights: no such file {m.pretrained_weights!r}")
    t = p.train
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(0 <= t.cutoff_epoch <= t.epochs,
           f"train.cutoff_epoch must be in [0, train.epochs={t.epochs}], got {t.cutoff_epoch}")
    _check(t.lambda_l1 >= 0, f"train.lambda_l1 must be >= 0, got {t.lambda_l1}")
    _check(0 < t.lr < 1, f"train.lr must be in (0, 1), got {t.lr}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
           f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _check(t.fast_path in FAST_PATH_CHOICES,
           f"train.fast_path must be one of {', '.join(FAST_PATH_CHOICES)}, got {t.fast_path!r}")
    _check(p.evaluate.overlay_count >= 0, "evaluate.overlay_count must be >= 0")
    _check(0 < p.evaluate.topk_percent <= 100, "evaluate.topk_percent must be in (0, 100]")
    _check(bool(p.mlflow.model_name.strip()), "mlflow.model_name must not be empty")
    _check_recalibrate(p.recalibrate)
    _validate_tune(p)
    return p


def _check_recalibrate(r: RecalibrateParams) -> None:
    distances = ("l2", "l1", "bce")  # medattn.training.feedback_loss.DISTANCES (not imported: torch)
    _check(r.gamma >= 0, f"recalibrate.gamma must be >= 0, got {r.gamma}")
    _check(r.distance in distances, f"recalibrate.distance must be one of {', '.join(distances)}, got {r.distance!r}")
    _check(0 <= r.tolerance < 1, f"recalibrate.tolerance must be in [0, 1), got {r.tolerance}")
    _check(r.min_feedback >= 1, f"recalibrate.min_feedback must be >= 1, got {r.min_feedback}")
    _check(r.interval_hours > 0, f"recalibrate.interval_hours must be > 0, got {r.interval_hours}")
    _check(r.epochs >= 1, f"recalibrate.epochs must be >= 1, got {r.epochs}")
    _check(0 < r.lr < 1, f"recalibrate.lr must be in (0, 1), got {r.lr}")
    _check(0 <= r.holdout_fraction < 1, f"recalibrate.holdout_fraction must be in [0, 1), got {r.holdout_fraction}")
    _check(r.feedback_batch_size >= 1, f"recalibrate.feedback_batch_size must be >= 1, got {r.feedback_batch_size}")



def _validate_tune(p: Params) -> None:
    # late: the search space's checks live beside the code that samples it
    from medattn.tuning.space import OBJECTIVES, parse_search_space

    t = p.tune
    _check(t.n_trials >= 1, f"tune.n_trials must be >= 1, got {t.n_trials}")
    _check(1 <= t.workers <= 256, f"tune.workers must be in [1, 256], got {t.workers}")
    _check(isinstance(t.objectives, list) and 1 <= len(t.objectives) <= 2
           and len(set(t.objectives)) == len(t.objectives) and all(o in OBJECTIVES for o in t.objectives),
           f"tune.objectives must be one or two of {', '.join(OBJECTIVES)}, got {t.objectives!r}")
    _check(t.pruner.n_startup_trials >= 0 and t.pruner.n_warmup_steps >= 0,
           "tune.pruner.n_startup_trials and n_warmup_steps must be >= 0")
    _check(t.heartbeat_seconds >= 1, f"tune.heartbeat_seconds must be >= 1, got {t.heartbeat_seconds}")
    _check(t.grace_seconds > t.heartbeat_seconds,
           f"tune.grace_seconds must exceed tune.heartbeat_seconds ({t.heartbeat_seconds}), got {t.grace_seconds}")
    _check(t.max_retry >= 0, f"tune.max_retry must be >= 0, got {t.max_retry}")
    _check(t.study_name is None or bool(t.study_name.strip()), "tune.study_name must not be empty (null = derived)")
    parse_search_space(t.space, p.train, check_epochs=False)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and range-check a params file."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    return validate_params(_coerce(Params, raw, ""))
