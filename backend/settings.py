"""All configuration, read from the environment once and validated.

Every other module receives a :class:`Settings` (or a slice of it) instead of reading ``os.environ``,
so a test can build one explicitly and two configurations can live in one process.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_GROUNDING_DINO_MODEL = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM_MODEL = "facebook/sam-vit-huge"
DEFAULT_SAM3_MODEL = "facebook/sam3"
DEFAULT_TRACKER_MODEL = "facebook/sam2.1-hiera-large"


class EngineKind(str, enum.Enum):
    """``ENGINE``: which models turn a prompt into regions."""

    GROUNDED_SAM = "grounded-sam"  # a detector (GROUNDING_DINO_MODEL) + a segmenter (SAM_MODEL)
    SAM3 = "sam3"  # SAM 3 alone (SAM3_MODEL): concept prompts → instances, its tracker for clicks
#: Images per engine batch when BATCH_SIZE is unset, and while BATCH_SIZE=auto is not resolved yet.
DEFAULT_BATCH_SIZE = 8
SAM_ATTENTIONS = ("sdpa", "flex")  # SAM_ATTENTION: backend.engine.relpos.RELPOS_ATTENTIONS

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class DetectThresholds:
    """The detector's knobs for one image: a box is kept when its phrase score is above ``box``
    and at least ``text``, boxes of one phrase overlapping by more than ``nms`` IoU are suppressed,
    and at most ``max_detections`` boxes are kept (best first). The deployment's come from the env
    (:meth:`Settings.detect_thresholds`); a request may override them (``backend.ls.selection``)."""

    box: float
    text: float
    nms: float
    max_detections: int


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used; the message names it and the fix."""


def _text(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean: use true or false")


def _number(env: Mapping[str, str], name: str, default: float, kind: type, low: float, high: float):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range: use a value in [{low}, {high}]")
    return value


def _optional_count(env: Mapping[str, str], name: str, high: int) -> int | None:
    """An integer in [1, high], or None when unset or empty (no limit)."""
    if (env.get(name) or "").strip() == "":
        return None
    return _number(env, name, 1, int, 1, high)


def _sam_attention(env) -> str:
    value = _text(env, "SAM_ATTENTION", "sdpa").lower()
    if value not in SAM_ATTENTIONS:
        raise SettingsError(f"SAM_ATTENTION={value!r} is not supported: use {' or '.join(SAM_ATTENTIONS)}")
    return value


def _batch_size(env: Mapping[str, str]) -> int | None:
    """``None`` means ``auto`` (chosen by the engine from free device memory)."""
    raw = (env.get("BATCH_SIZE") or str(DEFAULT_BATCH_SIZE)).strip().lower()
    if raw == "auto":
        return None
    return _number({"BATCH_SIZE": raw}, "BATCH_SIZE", DEFAULT_BATCH_SIZE, int, 1, 256)


VIDEO_DIRECTIONS = ("forward", "backward", "both")


def _engines(env: Mapping[str, str]) -> tuple[EngineKind, tuple[EngineKind, ...]]:
    """``(ENGINE, ENGINES)``: ENGINES defaults to ENGINE alone; ENGINE defaults to ENGINES' first,
    and must be one of them."""
    known = {kind.value for kind in EngineKind}

    def kind(value: str, name: str) -> EngineKind:
        value = value.strip().lower()
        if value not in known:
            raise SettingsError(f"{name}={value!r} is not an engine: use grounded-sam or sam3")
        return EngineKind(value)

    raw_engines = _text(env, "ENGINES", None)
    engines = tuple(dict.fromkeys(kind(v, "ENGINES") for v in raw_engines.split(",") if v.strip())) \
        if raw_engines else ()
    raw_engine = _text(env, "ENGINE", None)
    engine = kind(raw_engine, "ENGINE") if raw_engine else (engines[0] if engines else EngineKind.GROUNDED_SAM)
    if not engines:
        return engine, (engine,)
    if engine not in engines:
        raise SettingsError(f"ENGINE={engine.value} is not one of ENGINES={raw_engines}: ENGINE is the default "
                            "of the engines this process loads")
    return engine, engines


def _direction(env: Mapping[str, str]) -> str:
    value = (_text(env, "VIDEO_TRACK_DIRECTION", "forward") or "forward").lower()
    if value not in VIDEO_DIRECTIONS:
        raise SettingsError(f"VIDEO_TRACK_DIRECTION={value!r} is not a direction: use forward, backward or both")
    return value


@dataclass(frozen=True)
class Settings:
    engine: EngineKind = EngineKind.GROUNDED_SAM
    grounding_dino_model: str = DEFAULT_GROUNDING_DINO_MODEL
    sam_model: str = DEFAULT_SAM_MODEL
    sam3_model: str = DEFAULT_SAM3_MODEL
    device: str | None = None  # None = auto: cuda when available, else cpu
    dtype: str | None = None  # None = auto: bfloat16 on cuda, float32 on cpu
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    nms_threshold: float = 0.7
    max_detections: int = 100
    # Selection after the detector (backend.ls.selection): masks under this area are dropped (pixels
    # when >= 1, else a fraction of the image; 0 keeps all), and at most this many per label (None: no cap).
    min_mask_area: float = 0.0
    max_detections_per_label: int | None = None
    polygon_tolerance: float = 1.5  # pixels: Douglas–Peucker tolerance of polygon regions (backend.ls.polygons)
    batch_size: int | None = DEFAULT_BATCH_SIZE  # None = auto: the fastest batch that fits free GPU memory (8 on the CPU)
    compile: bool = False  # torch.compile the encoders' blocks at load, batch buckets 1 and BATCH_SIZE
    compile_cache_dir: str | None = None  # COMPILE=1: Inductor's caches here, reused by the next start
    sam_attention: str = "sdpa"  # SAM/SAM-HQ rel-pos attention: sdpa (dense bias) or flex (backend.engine.relpos)
    flush_denormals: bool = True  # CPU: subnormal floats as zero (see backend.engine.device.configure_device)
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    local_files_root: str | None = None
    allow_private_urls: bool = False
    max_image_pixels: int = 40_000_000  # 120 MB as RGB (3 bytes/pixel)
    decode_budget_mp: float = 100.0  # megapixels decoded at once per process (see backend.images.decode.PixelBudget)
    max_download_mb: float = 50.0
    download_connect_timeout: float = 5.0
    download_read_timeout: float = 30.0
    max_prompt_chars: int = 2000
    max_prompt_phrases: int = 32
    max_tasks_per_request: int = 1000  # tasks per /predict call (LS sends a Data Manager page at once)
    max_smart_prompts: int = 64  # smart-tool clicks + boxes per interactive call
    redis_url: str | None = field(default=None, repr=False)
    embedding_cache_mb: float = 2048.0  # SAM image embeddings kept for follow-up clicks (LRU, per process)
    predict_timeout: float = 60.0  # queue mode: how long /predict waits for workers (LS gives up at 100 s)
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    # /prelabel and /jobs act in LS with the backend's own API key: without basic auth they answer
    # 403 unless the operator opts in here (anyone who reaches the port could then start runs).
    allow_unauthenticated_bulk: bool = False
    log_level: str = "INFO"
    port: int = 9090
    worker_threads: int = 1  # torch/OpenMP threads per worker: several workers on a host must not each take every core
    preload_models: bool = True  # the web process starts loading the models at start (embedded mode)
    model_version: str | None = None  # None = derived from the two model ids
    remember_prompt: bool = True  # a project's last submitted prompt is its default (backend.modes.projects)
    prewarm_tasks: int = 3  # after a /predict for one task, encode the project's next N tasks (0 = off)
    # Video projects (backend.pipeline.video): the SAM 2.1 video checkpoint that tracks objects, how
    # often the detector looks for new objects and how far a drawn box is followed (LS frames; 0 =
    # about 1 s / 10 s at the config's frameRate), the keyframe thinning tolerance (percent), the
    # bounds, and how long a /predict call may track before it answers with what it has.
    tracker_model: str = DEFAULT_TRACKER_MODEL
    video_detect_every: int = 0
    video_track_frames: int = 0
    video_keyframe_tolerance: float = 0.5
    video_match_iou: float = 0.5  # a detection continues a track when their masks overlap this much
    video_max_objects: int = 50  # tracks per video (new detections beyond it are ignored, logged)
    video_track_direction: str = "forward"  # a drawn box is followed: forward, backward or both
    max_video_frames: int = 18_000  # 10 minutes at 30 fps
    max_video_mb: float = 500.0
    video_deadline: float = 50.0  # seconds; below PREDICT_TIMEOUT (60) and LS's 100 s
    # Engines per deployment (backend.modes): embedded mode loads each of ENGINES (ENGINE is the
    # default of projects that choose none); queue mode routes each project to its engine's workers.
    engines: tuple[EngineKind, ...] = (EngineKind.GROUNDED_SAM,)
    # Queue mode: an image's interactive jobs go to the worker that holds its embedding (consistent
    # hashing of the task over the engine's live workers) unless that worker has more than
    # AFFINITY_MAX_QUEUE jobs waiting; CLICK_AFFINITY=false sends every job to the shared queue.
    click_affinity: bool = True
    affinity_max_queue: int = 4
    # A many-task /predict ("Retrieve predictions") answers within this many seconds with what is
    # done; the rest becomes a bulk run that writes back through the LS API (0: no budget).
    retrieve_budget: float = 60.0

    #: What to do when a bulk run is asked for without LS credentials.
    LS_CREDENTIALS_NEEDED = "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend to pre-label projects"

    @property
    def has_label_studio_credentials(self) -> bool:
        """Both LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are set (bulk runs and adoption need them)."""
        return bool(self.label_studio_url and self.label_studio_api_key)

    def detect_thresholds(self) -> DetectThresholds:
        """The deployment's detector thresholds (BOX_THRESHOLD, TEXT_THRESHOLD, NMS_THRESHOLD, MAX_DETECTIONS)."""
        return DetectThresholds(self.box_threshold, self.text_threshold, self.nms_threshold, self.max_detections)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        device = _text(env, "DEVICE", "auto")
        dtype = _text(env, "DTYPE", "auto")
        if dtype not in {"auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"}:
            raise SettingsError(f"DTYPE={dtype!r} is not supported: use auto, float32, bfloat16 or float16")
        user, password = _text(env, "BASIC_AUTH_USER", None), _text(env, "BASIC_AUTH_PASS", None)
        if (user is None) != (password is None):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        log_level = (_text(env, "LOG_LEVEL", "INFO") or "INFO").upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError(f"LOG_LEVEL={log_level!r} is not a logging level: use DEBUG, INFO, WARNING or ERROR")
        ls_url = _text(env, "LABEL_STUDIO_URL", None)
        engine, engines = _engines(env)
        return cls(
            engine=engine,
            engines=engines,
            grounding_dino_model=_text(env, "GROUNDING_DINO_MODEL", DEFAULT_GROUNDING_DINO_MODEL),
            sam_model=_text(env, "SAM_MODEL", DEFAULT_SAM_MODEL),
            sam3_model=_text(env, "SAM3_MODEL", DEFAULT_SAM3_MODEL),
            device=None if device == "auto" else device,
            dtype=None if dtype == "auto" else dtype,
            box_threshold=_number(env, "BOX_THRESHOLD", 0.3, float, 0.0, 1.0),
            text_threshold=_number(env, "TEXT_THRESHOLD", 0.25, float, 0.0, 1.0),
            nms_threshold=_number(env, "NMS_THRESHOLD", 0.7, float, 0.0, 1.0),
            max_detections=_number(env, "MAX_DETECTIONS", 100, int, 1, 1000),
            min_mask_area=_number(env, "MIN_MASK_AREA", 0.0, float, 0.0, 1e9),
            max_detections_per_label=_optional_count(env, "MAX_DETECTIONS_PER_LABEL", 1000),
            polygon_tolerance=_number(env, "POLYGON_TOLERANCE", 1.5, float, 0.0, 100.0),
            batch_size=_batch_size(env),
            compile=_bool(env, "COMPILE", False),
            compile_cache_dir=_text(env, "COMPILE_CACHE_DIR", None),
            sam_attention=_sam_attention(env),
            flush_denormals=_bool(env, "FLUSH_DENORMALS", True),
            label_studio_url=ls_url.rstrip("/") if ls_url else None,
            label_studio_api_key=_text(env, "LABEL_STUDIO_API_KEY", None),
            local_files_root=_text(env, "LOCAL_FILES_DOCUMENT_ROOT", None),
            allow_private_urls=_bool(env, "ALLOW_PRIVATE_URLS", False),
            max_image_pixels=_number(env, "MAX_IMAGE_PIXELS", 40_000_000, int, 1, 2**40),
            decode_budget_mp=_number(env, "DECODE_BUDGET_MP", 100.0, float, 0.001, 1_000_000.0),
            max_download_mb=_number(env, "MAX_DOWNLOAD_MB", 50.0, float, 0.001, 10_000.0),
            download_connect_timeout=_number(env, "DOWNLOAD_CONNECT_TIMEOUT", 5.0, float, 0.01, 300.0),
            download_read_timeout=_number(env, "DOWNLOAD_READ_TIMEOUT", 30.0, float, 0.01, 600.0),
            max_prompt_chars=_number(env, "MAX_PROMPT_CHARS", 2000, int, 1, 100_000),
            max_prompt_phrases=_number(env, "MAX_PROMPT_PHRASES", 32, int, 1, 256),
            max_tasks_per_request=_number(env, "MAX_TASKS_PER_REQUEST", 1000, int, 1, 1_000_000),
            max_smart_prompts=_number(env, "MAX_SMART_PROMPTS", 64, int, 1, 10_000),
            redis_url=_text(env, "REDIS_URL", None),
            predict_timeout=_number(env, "PREDICT_TIMEOUT", 60.0, float, 1.0, 3600.0),
            embedding_cache_mb=_number(env, "EMBEDDING_CACHE_MB", 2048.0, float, 0.0, 1_000_000.0),
            basic_auth_user=user,
            basic_auth_pass=password,
            allow_unauthenticated_bulk=_bool(env, "ALLOW_UNAUTHENTICATED_BULK", False),
            log_level=log_level,
            port=_number(env, "PORT", 9090, int, 1, 65535),
            worker_threads=_number(env, "WORKER_THREADS", 1, int, 1, 1024),
            preload_models=_bool(env, "PRELOAD_MODELS", True),
            model_version=_text(env, "MODEL_VERSION", None),
            remember_prompt=_bool(env, "REMEMBER_PROMPT", True),
            prewarm_tasks=_number(env, "PREWARM_TASKS", 3, int, 0, 100),
            tracker_model=_text(env, "TRACKER_MODEL", DEFAULT_TRACKER_MODEL),
            video_detect_every=_number(env, "VIDEO_DETECT_EVERY", 0, int, 0, 1_000_000),
            video_track_frames=_number(env, "VIDEO_TRACK_FRAMES", 0, int, 0, 10_000_000),
            video_keyframe_tolerance=_number(env, "VIDEO_KEYFRAME_TOLERANCE", 0.5, float, 0.0, 100.0),
            video_match_iou=_number(env, "VIDEO_MATCH_IOU", 0.5, float, 0.0, 1.0),
            video_max_objects=_number(env, "VIDEO_MAX_OBJECTS", 50, int, 1, 1000),
            video_track_direction=_direction(env),
            max_video_frames=_number(env, "MAX_VIDEO_FRAMES", 18_000, int, 1, 10_000_000),
            max_video_mb=_number(env, "MAX_VIDEO_MB", 500.0, float, 0.001, 100_000.0),
            video_deadline=_number(env, "VIDEO_DEADLINE", 50.0, float, 1.0, 3600.0),
            click_affinity=_bool(env, "CLICK_AFFINITY", True),
            affinity_max_queue=_number(env, "AFFINITY_MAX_QUEUE", 4, int, 0, 10_000),
            retrieve_budget=_number(env, "RETRIEVE_BUDGET", 60.0, float, 0.0, 3600.0),
        )
