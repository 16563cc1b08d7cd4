"""``medattn``: the one command-line entry point.

The pipeline itself runs through DVC (``dvc repro``, ``dvc exp run``); this CLI covers what
happens around it: browsing runs, the model registry's aliases, serving, expert feedback and
API tokens.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medattn.config import load_params
from medattn.stage import run_stage

app = typer.Typer(
    help="medattn: attention-guided medical image classification with expert feedback. "
    "Run the pipeline with `dvc repro`; use these commands to browse runs (mlflow-ui), manage registered "
    "models (model), serve predictions with attention maps (serve), export expert feedback (feedback), "
    "create API tokens (auth) and search hyper-parameters (tune).",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="Registered models: which version is champion / challenger, promote, roll back.",
                        no_args_is_help=True)
feedback_app = typer.Typer(help="Expert feedback stored by the HTTP service.", no_args_is_help=True)
auth_app = typer.Typer(help="API bearer tokens (stored hashed).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(feedback_app, name="feedback")
app.add_typer(auth_app, name="auth")

ParamsOption = Annotated[Path, typer.Option("--params", help="parameters file with the mlflow.* settings")]
NameOption = Annotated[Optional[str], typer.Option("--name", help="registered model name (default: mlflow.model_name)")]


def _tracking(params_path: Path, name: Optional[str]) -> tuple[str, str]:
    from medattn.registry import resolve_tracking_uri

    params = load_params(params_path)
    return resolve_tracking_uri(params.mlflow.tracking_uri), name or params.mlflow.model_name


@app.command("mlflow-ui")
def mlflow_ui(
    params: ParamsOption = Path("params.yaml"),
    port: Annotated[int, typer.Option(help="port of the MLflow UI")] = 5000,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on this project's tracking database (runs side by side, registered models)."""
    from medattn.registry import mlflow_ui_command

    uri, _ = _tracking(params, None)
    shown = mlflow_ui_command(uri).split() + ["--host", host, "--port", str(port)]
    typer.echo(f"MLflow UI on http://{host}:{port}  ({' '.join(shown)})")
    # this interpreter's mlflow: the console script need not be on PATH (venv not activated)
    command = [sys.executable, "-m", "mlflow", *shown[1:]]
    os.execv(command[0], command)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 3000,
) -> None:
    """Serve the registry's champion over HTTP (BentoML): predictions with attention maps, expert feedback, /metrics. Settings come from MEDATTN_* environment variables (README, "Serving") and are checked before BentoML starts."""  # noqa: E501
    from medattn.serving.settings import run_bentoml_serve

    raise typer.Exit(run_bentoml_serve(host, port))


@model_app.command("info")
def model_info(params: ParamsOption = Path("params.yaml"), name: NameOption = None,
               alias: Annotated[str, typer.Argument(help="alias (champion, challenger), version number or latest")]
               = "champion") -> None:
    """Show a registered version: number, aliases, run and test macro-F1."""
    from medattn.registry import get_model_version_info

    uri, model_name = _tracking(params, name)
    typer.echo(json.dumps(get_model_version_info(model_name, alias, tracking_uri=uri).to_dict(), indent=2))


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


ActorOption = Annotated[Optional[str], typer.Option("--actor", help="who does it, for the audit log "
                                                    "(default: your login name)")]
AuditDbOption = Annotated[Optional[str], typer.Option(
    "--audit-db", envvar="MEDATTN_FEEDBACK_DB",
    help="database of the audit log: the service's feedback DB (default: sqlite:///<MEDATTN_STATE_DIR or "
    ".medattn>/feedback.db)")]


def _audited_move(move, params: Path, name: Optional[str], actor: Optional[str], audit_db: Optional[str]):
    """Run a promote / rollback with its audit row (``medattn.feedback.audit``)."""
    from medattn.feedback.audit import alias_change_recorder
    from medattn.feedback.store import FeedbackStore

    uri, model_name = _tracking(params, name)
    state = Path(os.environ.get("MEDATTN_STATE_DIR") or ".medattn")
    with FeedbackStore(audit_db or f"sqlite:///{state / 'feedback.db'}") as store:
        info = move(model_name, tracking_uri=uri,
                    on_change=alias_change_recorder(store, actor or _login_name(), uri))
    return model_name, info


@model_app.command("promote")
def model_promote(params: ParamsOption = Path("params.yaml"), name: NameOption = None, actor: ActorOption = None,
                  audit_db: AuditDbOption = None) -> None:
    """Accept the challenger: it becomes champion (served models pick it up on reload / poll); audited."""
    from medattn.registry import promote_challenger

    model_name, info = _audited_move(promote_challenger, params, name, actor, audit_db)
    typer.echo(f"{model_name}: champion is now version {info.version}")


@model_app.command("rollback")
def model_rollback(params: ParamsOption = Path("params.yaml"), name: NameOption = None, actor: ActorOption = None,
                   audit_db: AuditDbOption = None) -> None:
    """Point champion back at the previous champion; audited."""
    from medattn.registry import rollback_champion

    model_name, info = _audited_move(rollback_champion, params, name, actor, audit_db)
    typer.echo(f"{model_name}: champion rolled back to version {info.version}")


StateOption = Annotated[Path, typer.Option("--state-dir", envvar="MEDATTN_STATE_DIR",
                                           help="state folder (feedback DB, blobs, scheduler state and locks)")]


def _recalibration_job(params_path: Path, state_dir: Path, snapshot: Path, dataset: Path, actor: str):
    """(params, store, job): the job exports a fresh snapshot and recalibrates from it."""
    from medattn.feedback.blobs import BlobStore
    from medattn.feedback.export import export_snapshot
    from medattn.feedback.recalibration import recalibrate
    from medattn.feedback.store import FeedbackStore

    params = load_params(params_path)
    store = FeedbackStore(os.environ.get("MEDATTN_FEEDBACK_DB") or f"sqlite:///{state_dir / 'feedback.db'}")
    blobs = BlobStore(os.environ.get("MEDATTN_BLOB_DIR") or state_dir / "blobs")

    def job():
        export_snapshot(store, blobs, snapshot)
        result = recalibrate(params, snapshot, dataset, store, actor=actor,
                             out_path=Path("reports/recalibrate/result.json"))
        typer.echo(f"{result.model_name} v{result.version} (from v{result.parent_version}): {result.reason}"
                   + (" -> champion" if result.promoted else ""))
        return result

    return params, store, job


@app.command("recalibrate")
def recalibrate_command(
    params: ParamsOption = Path("params.yaml"),
    state_dir: StateOption = Path(".medattn"),
    snapshot: Annotated[Path, typer.Option(help="feedback snapshot folder to (re)export and train from")]
    = Path("data/feedback"),
    data: Annotated[Path, typer.Option(help="the champion's prepared dataset (its split is kept)")]
    = Path("data/prepared"),
    if_needed: Annotated[bool, typer.Option("--if-needed", help="only when recalibrate.min_feedback records wait "
                                            "or recalibrate.interval_hours passed with any (for cron)")] = False,
    actor: Annotated[str, typer.Option(help="who starts it, for the audit log")] = "recalibration",
) -> None:
    """Fine-tune the champion with the experts' ROIs (feedback loss), register and gate the challenger."""
    from medattn.feedback.scheduler import run_if_needed

    parsed, store, job = _recalibration_job(params, state_dir, snapshot, data, actor)
    with store:
        ran, why = run_if_needed(parsed, store, state_dir, job, force=not if_needed)
    if not ran:
        if not if_needed:
            from medattn.errors import MedattnError

            raise MedattnError(why)
        typer.echo(f"recalibration not started: {why}")


@app.command("scheduler")
def scheduler_command(
    params: ParamsOption = Path("params.yaml"),
    state_dir: StateOption = Path(".medattn"),
    snapshot: Annotated[Path, typer.Option(help="feedback snapshot folder")] = Path("data/feedback"),
    data: Annotated[Path, typer.Option(help="the champion's prepared dataset")] = Path("data/prepared"),
    poll_seconds: Annotated[float, typer.Option(help="seconds between checks")] = 300.0,
    max_checks: Annotated[Optional[int], typer.Option(help="stop after this many checks (default: run forever)")]
    = None,
    metrics_port: Annotated[int, typer.Option(help="serve the scheduler's gauges on 127.0.0.1:PORT/metrics "
                                              "(0 = off)")] = 0,
) -> None:
    """Run recalibrations when enough feedback waits (a long-running process; one at a time)."""
    from medattn.feedback.scheduler import run_scheduler

    if metrics_port:
        import prometheus_client

        from medattn.serving.metrics import get_metrics

        get_metrics()
        prometheus_client.start_http_server(metrics_port, addr="127.0.0.1")
    parsed, store, job = _recalibration_job(params, state_dir, snapshot, data, "scheduler")
    with store:
        run_scheduler(parsed, store, state_dir, job, poll_seconds=poll_seconds, max_checks=max_checks,
                      log=typer.echo)

@app.command("tune")
def tune(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="prepared dataset (`dvc repro validate` makes it)")]
    = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="report folder: best_params.yaml, best.json, trials.csv, figures/")]
    = Path("reports/tune"),
    checkpoints: Annotated[Path, typer.Option(help="folder of the default journal storage")] = Path("checkpoints/tune"),
    workers: Annotated[Optional[int], typer.Option(
        min=1, max=256, help="local worker processes (default: tune.workers); on a GPU host each gets its own GPU "
        "(CUDA_VISIBLE_DEVICES, round-robin)")] = None,
    storage: Annotated[Optional[str], typer.Option(
        help="journal file path or RDB URL, e.g. postgresql+psycopg://user@host/db (default: $MEDATTN_TUNE_STORAGE, "
        "tune.storage, the journal file under --checkpoints)")] = None,
    study_name: Annotated[Optional[str], typer.Option(
        help="study to create or join (default: tune.study_name, else derived from data and params)")] = None,
    report: Annotated[bool, typer.Option(
        help="write the report and finish the MLflow parent run when the study is done; --no-report for "
        "extra workers on other hosts")] = True,
) -> None:
    """Search hyper-parameters with Optuna (params.yaml `tune`): seeded TPE, median pruning per epoch, validation
    macro-F1 (optionally attention on the lesion masks too: a Pareto front). Re-running resumes the study; workers
    on other hosts join it with the same --storage and --study-name. Prints the `dvc exp run -S ...` line that trains
    with the best params."""
    from medattn.tuning.search import SearchRequest, run_search
    from medattn.tuning.space import dvc_exp_run_command

    loaded = load_params(params)
    outcome = run_search(SearchRequest(loaded, params, data, out, checkpoints, workers=workers, storage=storage,
                                       study_name=study_name, report=report))
    typer.echo(f"study {outcome.ref.name} (MLflow parent run {outcome.parent_run_id})")
    if outcome.summary is not None:
        typer.echo(f"best trial {outcome.summary['best_trial']}: {out / 'best_params.yaml'}")
        typer.echo(f"train with it: {dvc_exp_run_command(outcome.summary['params'])}")


def _register_library_commands() -> None:
    # Imported here so `medattn --help` stays fast and each concern keeps its own command code.
    from medattn.feedback.export import export_command
    from medattn.serving.auth import hash_token_command

    feedback_app.command("export")(export_command)
    auth_app.command("hash-token")(hash_token_command)


_register_library_commands()


def main() -> None:
    """Console-script entry: user errors print one line and exit 1."""
    run_stage(lambda: app(prog_name="medattn"))


if __name__ == "__main__":
    sys.exit(main())
