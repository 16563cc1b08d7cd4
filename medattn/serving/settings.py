"""Settings of the HTTP service, from environment variables (and an optional YAML file).

Every setting has a variable; a YAML file named by ``MEDATTN_SERVING_CONFIG`` may hold the same
settings under their field names (``poll_seconds: 10``), and a variable that is set wins over
the file. Defaults need no setup: the champion of ``params.yaml: mlflow.model_name`` from the
tracking URI the rest of medattn uses, and a state folder ``<repo>/.medattn`` for the feedback
database and images.

==========================  ======================  ============================================
variable                    field                   default
==========================  ======================  ============================================
MEDATTN_TRACKING_URI        tracking_uri            (see ``medattn.registry.resolve_tracking_uri``)
MEDATTN_MODEL_NAME          model_name              params.yaml ``mlflow.model_name``
MEDATTN_STATE_DIR           state_dir               ``<repo>/.medattn``
MEDATTN_FEEDBACK_DB         feedback_db             ``sqlite:///<state_dir>/feedback.db``
MEDATTN_BLOB_DIR            blob_dir                ``<state_dir>/blobs``
MEDATTN_MODEL_CACHE_DIR     model_cache_dir         ``<state_dir>/models``
MEDATTN_TOKENS_FILE         tokens_file             none (then ``MEDATTN_TOKENS``, JSON)
MEDATTN_OPEN_PREDICT        open_predict            false (true: /predict needs no token)
MEDATTN_POLL_SECONDS        poll_seconds            30 (how often the champion alias is checked; 0 = never)
MEDATTN_LOAD_WAIT_SECONDS   load_wait_seconds       60 (in_process: a prediction at a worker still loading waits this long, then 503)
MEDATTN_MAX_UPLOAD_BYTES    max_upload_bytes        20 MiB per request
MEDATTN_MAX_IMAGE_PIXELS    max_image_pixels        50 000 000 per image
MEDATTN_MAX_BATCH_IMAGES    max_batch_images        16 images per /predict_batch
MEDATTN_MAX_DECODED_BYTES   max_decoded_bytes       1 GiB an image may hold, decode to answer (from the header)
MEDATTN_MAX_BATCH_DECODED_BYTES  max_batch_decoded_bytes  2 GiB: the same estimate summed over one request
MEDATTN_MAX_INFLIGHT_DECODED_BYTES  max_inflight_decoded_bytes  8 GiB per API worker, all requests together
MEDATTN_DECODE_WAIT_SECONDS  decode_wait_seconds    30 (a request waiting longer for that budget is a 503)
MEDATTN_MAX_FRAME_PIXELS    max_frame_pixels        16 777 216 (4096x4096): larger images are reduced to this
MEDATTN_MAX_ASPECT_RATIO    max_aspect_ratio        4 (long side / short side; wider images are refused)
MEDATTN_MAX_FEEDBACK_MASK_PIXELS  max_feedback_mask_pixels  67 108 864: brush-mask pixels per feedback
MEDATTN_STORED_UPLOAD       stored_upload           reencoded (PNG of the frame) or original
MEDATTN_STRIP_METADATA      strip_metadata          true (original uploads: text/EXIF chunks, DICOM patient module)
MEDATTN_UPLOAD_RETENTION_HOURS  upload_retention_hours  720 (30 days; 0 = keep forever): images of uncited predictions
MEDATTN_RETENTION_SWEEP_SECONDS  retention_sweep_seconds  3600 (how often at most the API looks for expired images)
MEDATTN_DEVICE              device                  cpu (or cuda, cuda:N, auto: ``medattn.devices``)
MEDATTN_TORCH_THREADS       torch_threads           0 = half the CPU cores (see below)
MEDATTN_INFERENCE           inference               auto (or in_process, runner; see below)
MEDATTN_IN_PROCESS_MAX_MS   in_process_max_ms       10 (auto: in process when one image is faster)
==========================  ======================  ============================================

``inference`` says where the model runs (:mod:`medattn.serving.placement`): ``runner`` = in the
model-runner service, with adaptive batching, behind one more HTTP hop per request;
``in_process`` = in each API worker (no runner process at all), which pays for a light model whose
forward pass costs less than that hop; ``auto`` = both services run, and each time a champion is
loaded the API worker times its forward pass: on the CPU, a model whose one-image pass takes at
most ``in_process_max_ms`` is served in process, a slower one by the runner (whose batches pay
for a large model); on an accelerator always the runner, whose batches keep it busy.

``torch_threads`` is the intra-op thread count of the process that runs the model (the runner,
or the API worker when it serves in process). Half the cores leaves the rest to the API
worker's decoding of uploads and encoding of attention PNGs: best for a light model (the demo
``small_cnn`` serves 1.6x faster than with all cores on 2 cores); n API workers serving in
process share that half (at least one thread each). When the model dominates
(ResNet-50 at 224 px), set it to the number of cores.

Three more are read by ``serving/service.py`` when it is imported, because BentoML fixes them
when the service class is defined: ``MEDATTN_BATCH_MAX_SIZE`` (16),
``MEDATTN_BATCH_MAX_LATENCY_MS`` (1000; see ``serving/service.py``) and ``MEDATTN_API_WORKERS``
(HTTP worker processes: one per core, at most 4, by default, :func:`api_workers_from_env`; the
model runner is always one process). ``MEDATTN_INFERENCE`` is read
there too (:func:`inference_mode_from_env`), because it decides whether the runner service exists.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import yaml

from medattn.devices import resolve_device
from medattn.errors import ParamError, first_line
from medattn.feedback.schema import MAX_MASK_PIXELS_PER_FEEDBACK
from medattn.serving.imaging import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_BATCH_DECODED_BYTES,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    ImageLimits,
)
from medattn.serving.upload_storage import STORED_UPLOAD_POLICIES

if TYPE_CHECKING:
    from medattn.serving.auth import Authenticator

SERVICE_IMPORT = "serving.service:MedattnService"
CONFIG_FILE_ENV = "MEDATTN_SERVING_CONFIG"
DEFAULT_MODEL_NAME = "medattn-fundus"
STATE_DIRNAME = ".medattn"
INFERENCE_MODES = ("auto", "in_process", "runner")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_name(field: str) -> str:
    return {"feedback_db": "MEDATTN_FEEDBACK_DB"}.get(field, f"MEDATTN_{field.upper()}")


@dataclass(frozen=True)
class ServingSettings:
    tracking_uri: str
    model_name: str
    state_dir: Path
    feedback_db: str
    blob_dir: Path
    model_cache_dir: Path
    tokens_file: Optional[Path] = None
    open_predict: bool = False
    poll_seconds: float = 30.0
    load_wait_seconds: float = 60.0
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_batch_images: int = 16
    device: str = "cpu"
    torch_threads: int = 0
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    max_batch_decoded_bytes: int = DEFAULT_MAX_BATCH_DECODED_BYTES
    max_inflight_decoded_bytes: int = 8 * 1024**3
    decode_wait_seconds: float = 30.0
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    max_feedback_mask_pixels: int = MAX_MASK_PIXELS_PER_FEEDBACK
    stored_upload: str = "reencoded"
    strip_metadata: bool = True
    upload_retention_hours: float = 720.0
    retention_sweep_seconds: float = 3600.0
    inference: str = "auto"
    in_process_max_ms: float = 10.0

    @property
    def runner_torch_threads(self) -> int:
        """Intra-op threads of the model runner: the API worker decodes and encodes PNGs meanwhile."""
        return self.torch_threads or max(1, (os.cpu_count() or 2) // 2)

    def in_process_torch_threads(self, api_workers: int) -> int:
        """Intra-op threads of each of ``api_workers`` workers serving in process (:func:`in_process_torch_threads`)."""
        return in_process_torch_threads(self.torch_threads, api_workers)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_image_pixels,
                           max_decoded_bytes=self.max_decoded_bytes, max_frame_pixels=self.max_frame_pixels,
                           max_aspect_ratio=self.max_aspect_ratio)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None,
                 repo_root: Optional[Path] = None) -> "ServingSettings":
        """Read the settings; a malformed value is a :class:`ParamError` naming its variable."""
        from medattn.registry import find_repo_root, resolve_tracking_uri

        env = os.environ if environ is None else environ
        root = Path(repo_root) if repo_root is not None else find_repo_root()
        raw: dict[str, Any] = dict(_read_config_file(env.get(CONFIG_FILE_ENV)))
        for field in dataclasses.fields(cls):
            value = env.get(_env_name(field.name))
            if value is not None and value.strip() != "":
                raw[field.name] = value.strip()

        def where(field: str) -> str:
            return _env_name(field) if _env_name(field) in env else f"{env.get(CONFIG_FILE_ENV)}: {field}"

        state_dir = _path(raw.get("state_dir") or root / STATE_DIRNAME, root)
        # An explicit MEDATTN_TRACKING_URI wins inside resolve_tracking_uri; a file value is "configured".
        configured_uri = raw.get("tracking_uri") or _params_value(root, "tracking_uri")
        settings = cls(
            tracking_uri=resolve_tracking_uri(str(configured_uri) if configured_uri else None, start=root),
            model_name=str(raw.get("model_name") or _params_value(root, "model_name") or DEFAULT_MODEL_NAME),
            state_dir=state_dir,
            feedback_db=str(raw.get("feedback_db") or f"sqlite:///{state_dir / 'feedback.db'}"),
            blob_dir=_path(raw.get("blob_dir") or state_dir / "blobs", root),
            model_cache_dir=_path(raw.get("model_cache_dir") or state_dir / "models", root),
            tokens_file=_path(raw["tokens_file"], root) if raw.get("tokens_file") else None,
            open_predict=_bool(raw.get("open_predict", False), where("open_predict")),
            poll_seconds=_number(raw.get("poll_seconds", 30.0), float, where("poll_seconds"), 0),
            load_wait_seconds=_number(raw.get("load_wait_seconds", 60.0), float, where("load_wait_seconds"), 0),
            max_upload_bytes=_number(raw.get("max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES), int,
                                     where("max_upload_bytes"), 1),
            max_image_pixels=_number(raw.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS), int,
                                     where("max_image_pixels"), 1),
            max_batch_images=_number(raw.get("max_batch_images", 16), int, where("max_batch_images"), 1),
            device=str(raw.get("device", "cpu")),
            torch_threads=_number(raw.get("torch_threads", 0), int, where("torch_threads"), 0),
            max_decoded_bytes=_number(raw.get("max_decoded_bytes", DEFAULT_MAX_DECODED_BYTES), int,
                                      where("max_decoded_bytes"), 1),
            max_batch_decoded_bytes=_number(raw.get("max_batch_decoded_bytes", DEFAULT_MAX_BATCH_DECODED_BYTES),
                                            int, where("max_batch_decoded_bytes"), 1),
            max_inflight_decoded_bytes=_number(raw.get("max_inflight_decoded_bytes", 8 * 1024**3), int,
                                               where("max_inflight_decoded_bytes"), 1),
            decode_wait_seconds=_number(raw.get("decode_wait_seconds", 30.0), float, where("decode_wait_seconds"), 0),
            max_frame_pixels=_number(raw.get("max_frame_pixels", DEFAULT_MAX_FRAME_PIXELS), int,
                                     where("max_frame_pixels"), 1),
            max_aspect_ratio=_number(raw.get("max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO), float,
                                     where("max_aspect_ratio"), 1),
            max_feedback_mask_pixels=_number(raw.get("max_feedback_mask_pixels", MAX_MASK_PIXELS_PER_FEEDBACK),
                                             int, where("max_feedback_mask_pixels"), 1),
            stored_upload=_choice(raw.get("stored_upload", "reencoded"), STORED_UPLOAD_POLICIES,
                                  where("stored_upload")),
            strip_metadata=_bool(raw.get("strip_metadata", True), where("strip_metadata")),
            upload_retention_hours=_number(raw.get("upload_retention_hours", 720.0), float,
                                           where("upload_retention_hours"), 0),
            retention_sweep_seconds=_number(raw.get("retention_sweep_seconds", 3600.0), float,
                                            where("retention_sweep_seconds"), 0),
            inference=_inference_mode(raw.get("inference", "auto"), where("inference")),
            in_process_max_ms=_number(raw.get("in_process_max_ms", 10.0), float, where("in_process_max_ms"), 0),
        )
        try:
            # Resolved here only to refuse a bad name at start-up; the runner resolves it again.
            resolve_device(settings.device)
        except ParamError as exc:
            raise ParamError(f"{where('device')}: {exc}") from None
        return settings

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def authenticator(self, environ: Optional[Mapping[str, str]] = None) -> "Authenticator":
        """Tokens from ``tokens_file`` or ``MEDATTN_TOKENS``; none at all is fine when prediction is open."""
        from medattn.serving.auth import TOKENS_ENV, AuthConfigError, Authenticator

        env = os.environ if environ is None else environ
        if self.tokens_file is None and TOKENS_ENV not in env:
            if self.open_predict:
                return Authenticator([], open_predict=True, source="no tokens configured")
            raise AuthConfigError(f"no tokens configured: set MEDATTN_TOKENS_FILE or {TOKENS_ENV} "
                                  "(or MEDATTN_OPEN_PREDICT=true to serve predictions without a token)")
        # open_predict=True here wins over the token config's value; None leaves that value as is.
        return Authenticator.load(self.tokens_file, env, open_predict=self.open_predict or None)


def inference_mode_from_env(environ: Optional[Mapping[str, str]] = None) -> str:
    """Just ``inference`` (variable, else settings file, else auto): the service reads it at import."""
    env = os.environ if environ is None else environ
    value = (env.get("MEDATTN_INFERENCE") or "").strip()
    if value:
        return _inference_mode(value, "MEDATTN_INFERENCE")
    from_file = _read_config_file(env.get(CONFIG_FILE_ENV)).get("inference", "auto")
    return _inference_mode(from_file, f"{env.get(CONFIG_FILE_ENV)}: inference")


def in_process_torch_threads(configured: int, api_workers: int) -> int:
    """``configured`` (``MEDATTN_TORCH_THREADS``) if set, else half the cores shared among the API
    workers serving in process (the other half decodes and encodes), at least one each."""
    return configured or max(1, (os.cpu_count() or 2) // (2 * max(1, api_workers)))


#: most API worker processes chosen by default (each holds torch and, served in process, the model)
MAX_DEFAULT_API_WORKERS = 4


def api_workers_from_env(environ: Optional[Mapping[str, str]] = None) -> int:
    """``MEDATTN_API_WORKERS``, else one HTTP worker per CPU core up to :data:`MAX_DEFAULT_API_WORKERS`.

    Read by the service at import (BentoML fixes ``workers`` when the class is defined). Several
    workers are safe to follow one champion: an Accept / Roll back / reload in any of them is
    seen by the others before their next prediction (:mod:`medattn.serving.champion_signal`).
    """
    env = os.environ if environ is None else environ
    value = (env.get("MEDATTN_API_WORKERS") or "").strip()
    if not value:
        return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_API_WORKERS))
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ParamError(f"MEDATTN_API_WORKERS must be a whole number >= 1, got {value!r}")
    return workers


def bentoml_serve_command(host: str = "127.0.0.1", port: int = 3000) -> list[str]:
    """The command that serves medattn; run it with the repo root as working directory."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port)]


def run_bentoml_serve(host: str = "127.0.0.1", port: int = 3000, repo_root: Optional[Path] = None) -> int:
    """Check the settings (one-line errors), then serve in the foreground; returns the exit code."""
    from medattn.registry import find_repo_root

    root = Path(repo_root) if repo_root is not None else find_repo_root()
    settings = ServingSettings.from_env(repo_root=root)
    settings.authenticator()
    return subprocess.call(bentoml_serve_command(host, port), cwd=root)


def _read_config_file(path: Optional[str]) -> Mapping[str, Any]:
    if not path:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ParamError(f"{CONFIG_FILE_ENV}={path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ParamError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, Mapping):
        raise ParamError(f"{path}: expected a mapping of setting names to values")
    known = {f.name for f in dataclasses.fields(ServingSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return raw


def _params_value(root: Path, key: str) -> Optional[str]:
    """``mlflow.<key>`` of the repo's params.yaml, if there is a readable one."""
    path = root / "params.yaml"
    if not path.is_file():
        return None
    from medattn.config import load_params

    return getattr(load_params(path).mlflow, key)


def _path(value: Any, root: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else root / path


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ParamError(f"{where} must be true or false, got {value!r}")


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ParamError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return text


def _inference_mode(value: Any, where: str) -> str:
    text = str(value).strip().lower().replace("-", "_")
    if text not in INFERENCE_MODES:
        raise ParamError(f"{where} must be one of {', '.join(INFERENCE_MODES)}, got {value!r}")
    return text


def _number(value: Any, kind: type, where: str, minimum: float) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value) if kind is float else int(str(value).replace("_", ""))
    except (TypeError, ValueError):
        raise ParamError(f"{where} must be {'a number' if kind is float else 'an integer'}, got {value!r}") from None
    if number < minimum:
        raise ParamError(f"{where} must be >= {minimum:g}, got {value!r}")
    return number
