"""One predict call through the stages: tasks → images → engine → regions.

The pipeline owns the long-lived parts of a process: the engine (models, created once on first
use, under a lock), the image loader and the metrics. Each call only reads them.

A request's options (``request.options``, the project's ``extra_params``) and its label config's
``model_score_threshold`` attributes reach the engine as per-image detector thresholds and the
regions stage as the selection (``backend.ls.selection``); a request without either runs exactly
as the env says.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from backend.errors import ModelLoadError
from backend.images.fetch import FetchSettings, ImageError, ImageLoader, LoadedImage
from backend.metrics import Metrics
from backend.modelinfo import model_sources, model_version
from backend.ls.polygons import PolygonParams
from backend.ls.regions import build_prediction, empty_prediction
from backend.ls.selection import DropReason, SelectDefaults, request_thresholds
from backend.settings import DEFAULT_BATCH_SIZE, Settings
from backend.pipeline.loadlock import MODEL_LOADS
from backend.pipeline.outcome import TaskOutcome
from backend.pipeline.refine import refine_image
from backend.ls.smartprompt import parse_smart_prompt
from backend.ls.tasks import (PredictRequest, PromptLimits, TaskPlan, asks_for_nothing, check_smart_prompt, plan_tasks)

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8  # downloads wait on the network; decoding and resizing release the GIL
# RLE + JSON behind the engine. Two threads, not one per core: encoding is GIL-bound Python and
# numpy calls, so more threads do not encode faster (bench/RESULTS.md, RLE); the point is to
# overlap encoding with the engine, whose forward passes release the GIL.
ENCODE_THREADS = 2
LOOKAHEAD_BATCHES = 2  # images loaded ahead of the engine, in batches: bounds host memory


def prompt_limits(settings: Settings) -> PromptLimits:
    return PromptLimits(settings.max_prompt_chars, settings.max_prompt_phrases,
                        max_tasks=settings.max_tasks_per_request, max_smart_prompts=settings.max_smart_prompts)


def fetch_settings(settings: Settings) -> FetchSettings:
    return FetchSettings(
        label_studio_url=settings.label_studio_url, api_key=settings.label_studio_api_key,
        connect_timeout=settings.download_connect_timeout, read_timeout=settings.download_read_timeout,
        max_download_bytes=int(settings.max_download_mb * 2**20), max_image_pixels=settings.max_image_pixels,
        allow_private_urls=settings.allow_private_urls, local_files_root=settings.local_files_root,
        decode_budget_pixels=int(settings.decode_budget_mp * 1_000_000))


@dataclass(frozen=True)
class ImageFailure:
    """Why one task has no usable image (safe to log and to report: no tokens, no bodies)."""

    reason: str


@dataclass(frozen=True)
class ReadyImage:
    """One task's image, loaded and prepared for the engine (``prepared``: an engine PreparedImage)."""

    loaded: LoadedImage
    prepared: object


def _reason(what: str, exc: Exception) -> str:
    """A per-image failure reason: an ImageError's own reason, else the type and first line."""
    if isinstance(exc, ImageError):
        return exc.reason
    lines = str(exc).splitlines()
    return f"{what} ({type(exc).__name__}: {lines[0][:200] if lines else ''})"


def unexpected_load_error(settings: Settings, exc: Exception) -> ModelLoadError:
    """A ModelLoadError for an exception the engine did not map itself (worded like
    ``backend.engine.families.load_error``, which this module may not import: torch)."""
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return ModelLoadError("ENGINE", settings.engine.value, "too little memory to load the models",
                              "free the device, use smaller checkpoints or DTYPE=bfloat16, or set DEVICE=cpu")
    lines = str(exc).strip().splitlines()
    return ModelLoadError(
        "ENGINE", settings.engine.value,
        f"the models could not be loaded ({type(exc).__name__}: {lines[0][:200] if lines else ''})",
        f"check {', '.join(model_sources(settings))}, DEVICE and DTYPE (the log has the traceback), then restart")


class Pipeline:
    def __init__(self, settings: Settings, engine_factory: Callable | None = None,
                 loader: ImageLoader | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.model_version = model_version(settings)
        self.limits = prompt_limits(settings)
        self.thresholds = settings.detect_thresholds()
        self.select_defaults = SelectDefaults.from_settings(settings)
        self.polygon = PolygonParams(tolerance=settings.polygon_tolerance)  # POLYGON_TOLERANCE
        self.loader = loader or ImageLoader(fetch_settings(settings))
        self.metrics = metrics or Metrics()
        for reason in DropReason:  # every reason in /metrics from the start, at 0
            self.metrics.dropped_detections.labels(reason.key)
        self._engine_factory = engine_factory or self._default_engine
        self._engine = None
        self._video = None
        self.load_error: ModelLoadError | None = None
        self._engine_lock = threading.Lock()
        self._active = 0  # predict calls in progress: background work (pre-warming) waits for 0
        self._idle = threading.Condition()

    def _default_engine(self):
        from backend.engine.engine import build_engine  # torch is imported only by the process that runs models

        return build_engine(self.settings, self.metrics)

    def engine(self):
        """The engine, created on first use; concurrent first calls wait for one load.

        A load that fails is not retried: every later call raises the same ModelLoadError (a
        missing directory or a wrong family stays so until the settings change and the process
        restarts), and :attr:`load_error` holds it for /health. Any other exception of the factory
        becomes one too (:func:`unexpected_load_error`), its traceback logged once."""
        with self._engine_lock:
            if self.load_error is not None:
                raise self.load_error
            if self._engine is None:
                started = time.perf_counter()
                try:
                    with MODEL_LOADS:  # from_pretrained is not thread-safe (another engine may be loading)
                        self._engine = self._engine_factory()
                except ModelLoadError as exc:
                    self.load_error = exc
                    log.error("the models cannot be loaded: %s", exc.reason)
                    raise
                except Exception as exc:  # any failure to load is one state, not a retry per request
                    self.load_error = unexpected_load_error(self.settings, exc)
                    log.error("the models cannot be loaded: %s", self.load_error.reason, exc_info=True)
                    raise self.load_error from None
                self.metrics.models_loaded.set(1)
                log.info("models ready in %.1f s", time.perf_counter() - started)
            return self._engine

    def predict(self, request: PredictRequest) -> list[dict]:
        """Exactly one prediction per task, in task order; a task that fails gets an empty one."""
        return [outcome.prediction for outcome in self.predict_outcomes(request)]

    def predict_outcomes(self, request: PredictRequest) -> list[TaskOutcome]:
        """Like :meth:`predict`, with the reason each failed task's prediction is empty."""
        with self._idle:
            self._active += 1
        try:
            return self._predict_outcomes(request)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no predict call is running (True), or ``timeout`` seconds (False). Background
        work calls it before each engine call so it never goes ahead of an annotator's request."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    @property
    def video_load_error(self) -> ModelLoadError | None:
        """Why a video model (TRACKER_MODEL, or SAM3_MODEL's video model) cannot be loaded, once a
        video call tried; else None."""
        if self._video is None:
            return None
        return self._video.load_error or self._video.sam3_load_error

    @property
    def video(self):
        """The video half (:class:`backend.pipeline.video.VideoPipeline`), made on first use."""
        with self._engine_lock:
            if self._video is None:
                from backend.pipeline.video import VideoPipeline  # PyAV: only for video projects

                self._video = VideoPipeline(self)
            return self._video

    def _predict_outcomes(self, request: PredictRequest) -> list[TaskOutcome]:
        if request.config.is_video:
            return self.video.predict_outcomes(request)
        smart = parse_smart_prompt(request.context, request.config)
        check_smart_prompt(request, smart, self.limits)
        if asks_for_nothing(request):
            log.info("interactive call with no prompt text and no smart-tool regions: %d empty predictions",
                     len(request.tasks))
            return [TaskOutcome(empty_prediction(self.model_version)) for _ in request.tasks]
        plans = plan_tasks(request, self.limits)
        if smart:
            return self._refine_all(plans, request, smart)
        return self._detect_all(plans, request)

    def _detect_all(self, plans: list[TaskPlan], request: PredictRequest) -> list[TaskOutcome]:
        """Text prompt → regions for every task, as a three-stage pipeline.

        Threads download, decode and prepare images (the models' CPU halves) ahead of the engine;
        the calling thread feeds the engine one batch at a time; another pool encodes RLE and builds
        the LS JSON of finished batches. So the GPU never waits for JPEG decoding or RLE, and those
        never wait for the GPU. At most ``LOOKAHEAD_BATCHES`` batches of images are held ahead.
        """
        outcomes: list[TaskOutcome | None] = [None] * len(plans)
        # Interactive calls (with a context) cache SAM embeddings: the annotator may click next.
        cache_embeddings = request.context is not None
        thresholds = self.detect_thresholds(request)  # once per request, not per batch or retry
        with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="gsam-load") as loaders, \
                ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="gsam-encode") as encoders:
            batch_size = self.batch_size()
            pending = deque()  # (plan index, future of ReadyImage | ImageFailure)
            encoded = []  # (plan index, future of TaskOutcome)
            batch: list[tuple[int, ReadyImage]] = []
            next_plan = 0
            while pending or next_plan < len(plans):
                while next_plan < len(plans) and len(pending) < LOOKAHEAD_BATCHES * batch_size:
                    pending.append((next_plan, loaders.submit(self._load_and_prepare, plans[next_plan])))
                    next_plan += 1
                index, future = pending.popleft()
                ready = future.result()
                if isinstance(ready, ImageFailure):
                    outcomes[index] = self._failed(plans[index], ready.reason)
                else:
                    batch.append((index, ready))
                if len(batch) == batch_size or (batch and not pending and next_plan == len(plans)):
                    done, failed = self._run_batch(batch, plans, request, cache_embeddings, encoders, thresholds)
                    encoded.extend(done)
                    for failed_index, reason in failed:
                        outcomes[failed_index] = self._failed(plans[failed_index], reason)
                    batch = []
                    batch_size = self.batch_size()
            for index, future in encoded:
                outcomes[index] = future.result()
        return outcomes  # type: ignore[return-value]

    def batch_size(self) -> int:
        """Images per engine batch: the engine's once it is loaded (BATCH_SIZE=auto resolved), else
        the configured one (``DEFAULT_BATCH_SIZE`` while auto is not resolved yet)."""
        if self._engine is not None:
            return getattr(self._engine, "batch_size", None) or DEFAULT_BATCH_SIZE
        return self.settings.batch_size or DEFAULT_BATCH_SIZE

    def _load_and_prepare(self, plan: TaskPlan) -> ReadyImage | ImageFailure:
        """The plan's image loaded and prepared, or why it has none. A model that cannot load is
        everyone's failure and raises; an image the models cannot take (4000x1) fails alone."""
        with self.metrics.stage_seconds.labels("images").time():
            loaded = self._load(plan)
        if isinstance(loaded, ImageFailure):
            return loaded
        engine = self.engine()
        with self.metrics.stage_seconds.labels("prepare").time():
            try:
                return ReadyImage(loaded, engine.prepare(loaded.image))
            except Exception as exc:  # any error of one image's preparation fails only its task
                log.debug("task %s: prepare failed", plan.task_id, exc_info=True)
                return ImageFailure(_reason(f"the models cannot take this {loaded.width}x{loaded.height} image",
                                            exc))

    def _run_batch(self, batch: list[tuple[int, ReadyImage]], plans, request, cache_embeddings, encoders,
                   thresholds):
        """Run one batch: ([(plan index, future of TaskOutcome)], [(plan index, failure reason)]).

        When the batch raises, its images are run again one by one, so only the image that
        raises alone fails (and an out-of-memory batch still labels what fits)."""
        engine = self.engine()
        try:
            results = self._run_engine(engine, batch, plans, cache_embeddings, thresholds)
        except Exception as exc:  # one bad image must not fail its batch-mates: retry them alone
            if len(batch) == 1:
                log.warning("task %s: the engine failed on its image", plans[batch[0][0]].task_id, exc_info=True)
                return [], [(batch[0][0], _reason("the models failed on this image", exc))]
            log.warning("a batch of %d images failed (%s); running them one by one", len(batch), type(exc).__name__)
            done, failed = [], []
            for item in batch:
                one_done, one_failed = self._run_batch([item], plans, request, cache_embeddings, encoders,
                                                        thresholds)
                done.extend(one_done)
                failed.extend(one_failed)
            return done, failed
        return [(index, encoders.submit(self._regions, plans[index], result, request))
                for (index, _), result in zip(batch, results)], []

    def detect_thresholds(self, request: PredictRequest):
        """The request's detector thresholds, or None when they are the env's (the engine's own)."""
        thresholds = request_thresholds(request.config, request.options, self.thresholds)
        return None if thresholds == self.thresholds else thresholds

    def _run_engine(self, engine, batch: list[tuple[int, ReadyImage]], plans, cache_embeddings, thresholds):
        keys = [ready.loaded.sha256 for _, ready in batch] if cache_embeddings else None
        images, phrases = [ready.prepared for _, ready in batch], [plans[i].phrases for i, _ in batch]
        with self.metrics.stage_seconds.labels("engine").time():
            if thresholds is None:  # the engine's own thresholds: the call every engine takes
                return engine.run(images, phrases, keys)
            return engine.run(images, phrases, keys, thresholds=[thresholds] * len(batch))

    def _regions(self, plan: TaskPlan, result, request: PredictRequest) -> TaskOutcome:
        with self.metrics.stage_seconds.labels("regions").time():
            try:
                prediction, stats = build_prediction(result, request.config, self.model_version,
                                                     options=request.options, defaults=self.select_defaults,
                                                     polygon=self.polygon)
            except Exception as exc:  # a failure building one task's regions fails only that task
                log.warning("task %s: building its regions failed", plan.task_id, exc_info=True)
                return self._failed(plan, _reason("the regions of this image could not be built", exc))
        self._count(plan, prediction, stats)
        return TaskOutcome(prediction)

    def _failed(self, plan: TaskPlan, reason: str) -> TaskOutcome:
        self.metrics.tasks.labels("no_image" if plan.error else "image_error").inc()
        log.warning("task %s: empty prediction: %s", plan.task_id, reason)
        return TaskOutcome(empty_prediction(self.model_version), reason)

    def _refine_all(self, plans: list[TaskPlan], request: PredictRequest, smart) -> list[TaskOutcome]:
        """Smart-tool clicks/boxes (with the text prompt's detections when the context has text)."""
        text = request.prompt_text()
        # Clicks alone need no pixels when the image's embedding is cached: load the bytes, hash
        # them, and decode only if the engine asks (text needs the detector, so pixels, at once).
        load = functools.partial(self._load, defer=not text)
        if len(plans) == 1:  # a smart-tool call has one task: no pool to start per click
            loaded = [load(plans[0])]
        else:
            with ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(plans)) or 1) as loaders:
                loaded = list(loaders.map(load, plans))
        # per request: the project's tolerance over POLYGON_TOLERANCE (no minimum area: the annotator
        # asked for each mask), and the detector thresholds of the text part
        polygon = PolygonParams(tolerance=request.options.tolerance(self.polygon.tolerance),
                                min_area=self.polygon.min_area)
        thresholds = self.detect_thresholds(request)
        outcomes = []
        for plan, item in zip(plans, loaded):
            if isinstance(item, ImageFailure):
                outcomes.append(self._failed(plan, item.reason))
                continue
            engine = self.engine()
            with self.metrics.stage_seconds.labels("refine").time():
                try:
                    prediction, stats = refine_image(
                        engine, item, request.config, smart, plan.phrases if text else None, self.model_version,
                        polygon, thresholds, request.options, self.select_defaults.box_threshold)
                except Exception as exc:  # one image the models cannot take fails only its task
                    log.warning("task %s: refining failed", plan.task_id, exc_info=not isinstance(exc, ImageError))
                    outcomes.append(self._failed(plan, _reason(
                        f"the models cannot take this {item.width}x{item.height} image", exc)))
                    continue
            outcomes.append(TaskOutcome(prediction))
            self._count(plan, prediction, stats)
        return outcomes

    def _count(self, plan: TaskPlan, prediction: dict, stats) -> None:
        self.metrics.tasks.labels("ok").inc()
        for region in prediction["result"]:
            self.metrics.regions.labels(region["type"]).inc()
        for reason, count in stats.dropped.items():
            self.metrics.dropped_detections.labels(reason.key).inc(count)
        dropped = sum(stats.dropped_phrases.values())
        if dropped:
            log.info("task %s: dropped %d detections whose phrase maps to no label (%s)", plan.task_id,
                     dropped, ", ".join(sorted(stats.dropped_phrases)))
        selected_out = {reason.name.lower(): count for reason, count in stats.dropped.items()
                        if reason is not DropReason.UNMAPPED}
        if selected_out:  # thresholds, minimum area and caps doing their job: not an anomaly
            log.debug("task %s: detections left out by selection: %s", plan.task_id, selected_out)
        log.info("task %s: %d regions", plan.task_id, stats.regions)

    def _load(self, plan: TaskPlan, defer: bool = False) -> LoadedImage | ImageFailure:
        """The plan's image, or the reason it has none (safe to log: no tokens, no bodies);
        ``defer``: see :meth:`ImageLoader.load`."""
        if plan.error:
            return ImageFailure(plan.error)
        try:
            return self.loader.load(plan.image_url, task_id=plan.task_id, defer=defer)
        except ImageError as exc:
            return ImageFailure(exc.reason)
