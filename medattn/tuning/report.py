"""What a finished study leaves behind: best params for the train stage, a trial table, plots.

``<out>/best_params.yaml`` has the shape of ``params.yaml`` (``model: {K: 64}``, ``train: {...}``)
and, in its header, the ``dvc exp run -S ...`` line that trains with it; ``best.json`` (a DVC
metric, so ``dvc exp show`` / ``dvc metrics show`` list the best value and params); ``trials.csv``;
``figures/`` with Optuna's matplotlib plots (optimisation history, param importances and, for two
objectives, the Pareto front). ``candidates.yaml`` lists the trials to choose from, each with its
command: the best trial, or with two objectives (no single winner) every non-dominated trial;
``best_params.yaml`` then holds the Pareto trial with the highest validation macro-F1.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from medattn.atomic_files import write_json_atomic, write_text_atomic
from medattn.tuning.space import as_params_tree, dvc_exp_run_command

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def chosen_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front, highest validation macro-F1 first."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: (-t.values[0], -t.values[1], t.number))


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = dict.fromkeys(("complete", "pruned", "failed", "running", "waiting"), 0)
    for trial in study.get_trials(deepcopy=False):
        counts[STATES.get(trial.state, "failed")] += 1
    return counts


def write_study_report(study: optuna.Study, objectives: list[str], out_dir: Path) -> dict[str, Any]:
    """Write every report file; returns the summary that also goes to ``best.json``."""
    from medattn.tuning.study import TuneError

    chosen = chosen_trials(study)
    counts = state_counts(study)
    if not chosen:
        raise TuneError(f"study {study.study_name!r}: no trial completed ({counts['pruned']} pruned, "
                        f"{counts['failed']} failed): nothing to report")
    best = chosen[0]
    summary: dict[str, Any] = {
        "study": study.study_name,
        "best_trial": best.number,
        **{f"best_{name}": value for name, value in zip(objectives, best.values, strict=True)},
        "params": dict(sorted(best.params.items())),
        "trials": counts,
        "pareto_front_size": len(chosen) if len(objectives) > 1 else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    command = dvc_exp_run_command(best.params)
    header = (f"# Best trial {best.number} of study {study.study_name}: "
              + ", ".join(f"{n} {v:.4f}" for n, v in zip(objectives, best.values, strict=True))
              + f"\n# Train with it:  {command}\n# (or copy these values into params.yaml)\n")
    tree = yaml.safe_dump(as_params_tree(best.params), sort_keys=True)
    write_text_atomic(out_dir / "best_params.yaml", header + tree)
    candidates = [{"trial": t.number, **dict(zip(objectives, t.values, strict=True)),
                   "params": as_params_tree(t.params), "command": dvc_exp_run_command(t.params)} for t in chosen]
    write_text_atomic(out_dir / "candidates.yaml", yaml.safe_dump(candidates, sort_keys=False))
    write_text_atomic(out_dir / "trials.csv", trials_csv(study, objectives))
    write_json_atomic(out_dir / "best.json", summary)
    summary["figures"] = [str(p) for p in write_study_figures(study, objectives, out_dir / "figures")]
    return summary


def trials_csv(study: optuna.Study, objectives: list[str]) -> str:
    names = sorted({name for t in study.get_trials(deepcopy=False) for name in t.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", *objectives, "epochs_reported", "retry_of", "duration_s", *names])
    for t in study.get_trials(deepcopy=False):
        values = list(t.values) if t.values is not None else [None] * len(objectives)
        history = t.system_attrs.get("retry_history") or []
        duration = t.duration.total_seconds() if t.duration is not None else None
        writer.writerow([t.number, STATES.get(t.state, "failed"), *values, len(t.intermediate_values),
                         history[-1] if history else "", None if duration is None else round(duration, 2),
                         *(t.params.get(n, "") for n in names)])
    return buffer.getvalue()


def write_study_figures(study: optuna.Study, objectives: list[str], folder: Path) -> list[Path]:
    """Optuna's matplotlib plots as PNG; a plot the study cannot have yet (too few trials) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    first = (lambda t: t.values[0]) if len(objectives) > 1 else None
    wanted: list[tuple[str, Any]] = [
        ("optimization_history.png", lambda: plots.plot_optimization_history(
            study, target=first, target_name=objectives[0])),
        ("param_importances.png", lambda: plots.plot_param_importances(
            study, target=first, target_name=objectives[0])),
    ]
    if len(objectives) > 1:
        wanted.append(("pareto_front.png", lambda: plots.plot_pareto_front(study, target_names=objectives)))
    written = []
    for name, draw in wanted:
        figure = _draw(draw)
        if figure is None:
            continue
        path = folder / name
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _draw(draw) -> Optional[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is experimental in Optuna
        try:
            axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError):
            return None  # e.g. importances need two complete trials with varying params
    axes = axes.flat[0] if hasattr(axes, "flat") else axes
    return axes.figure
