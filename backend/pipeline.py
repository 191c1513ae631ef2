"""One predict call through the stages: tasks → images → engine → regions.

The pipeline owns the long-lived parts of a process: the engine (models, created once on first
use, under a lock), the image loader and the metrics. Each call only reads them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from backend.images import FetchSettings, ImageError, ImageLoader, LoadedImage
from backend.metrics import Metrics
from backend.regions import build_prediction, empty_prediction
from backend.settings import Settings
from backend.refine import refine_image
from backend.smartprompt import parse_smart_prompt
from backend.tasks import PredictRequest, PromptLimits, TaskPlan, plan_tasks, prompt_text

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8  # downloads wait on the network; decoding and resizing release the GIL
# RLE + JSON behind the engine. Two threads, not one per core: encoding is GIL-bound Python and
# numpy calls, so more threads do not encode faster (bench/RESULTS.md, RLE); the point is to
# overlap encoding with the engine, whose forward passes release the GIL.
ENCODE_THREADS = 2
LOOKAHEAD_BATCHES = 2  # images loaded ahead of the engine, in batches: bounds host memory


def model_version(settings: Settings) -> str:
    """``MODEL_VERSION`` if set, else the two model names: 'grounding-dino-tiny+sam-vit-huge'."""
    if settings.model_version:
        return settings.model_version
    names = [s.rstrip("/").split("/")[-1] for s in (settings.grounding_dino_model, settings.sam_model)]
    return "+".join(names)


def prompt_limits(settings: Settings) -> PromptLimits:
    return PromptLimits(settings.max_prompt_chars, settings.max_prompt_phrases)


def fetch_settings(settings: Settings) -> FetchSettings:
    return FetchSettings(
        label_studio_url=settings.label_studio_url, api_key=settings.label_studio_api_key,
        connect_timeout=settings.download_connect_timeout, read_timeout=settings.download_read_timeout,
        max_download_bytes=int(settings.max_download_mb * 2**20), max_image_pixels=settings.max_image_pixels,
        allow_private_urls=settings.allow_private_urls, local_files_root=settings.local_files_root)


@dataclass(frozen=True)
class TaskOutcome:
    """One task's answer: its prediction, and why it is empty when the task failed (else None)."""

    prediction: dict
    error: str | None = None


class Pipeline:
    def __init__(self, settings: Settings, engine_factory: Callable | None = None,
                 loader: ImageLoader | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.model_version = model_version(settings)
        self.limits = prompt_limits(settings)
        self.loader = loader or ImageLoader(fetch_settings(settings))
        self.metrics = metrics or Metrics()
        self._engine_factory = engine_factory or self._default_engine
        self._engine = None
        self._engine_lock = threading.Lock()

    def _default_engine(self):
        from backend.engine import Engine  # torch is imported only by the process that runs models

        return Engine.from_settings(self.settings, self.metrics)

    def engine(self):
        """The engine, created on first use; concurrent first calls wait for one load."""
        with self._engine_lock:
            if self._engine is None:
                started = time.perf_counter()
                self._engine = self._engine_factory()
                self.metrics.models_loaded.set(1)
                log.info("models ready in %.1f s", time.perf_counter() - started)
            return self._engine

    def predict(self, request: PredictRequest) -> list[dict]:
        """Exactly one prediction per task, in task order; a task that fails gets an empty one."""
        return [outcome.prediction for outcome in self.predict_outcomes(request)]

    def predict_outcomes(self, request: PredictRequest) -> list[TaskOutcome]:
        """Like :meth:`predict`, with the reason each failed task's prediction is empty."""
        plans = plan_tasks(request, self.limits)
        smart = parse_smart_prompt(request.context, request.config)
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
        with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="gsam-load") as loaders, \
                ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="gsam-encode") as encoders:
            batch_size = self._batch_size()
            pending = deque()  # (plan index, future of LoadedImage/PreparedImage or a reason)
            encoded = []  # (plan index, future of TaskOutcome)
            batch: list[tuple[int, LoadedImage, object]] = []
            next_plan = 0
            while pending or next_plan < len(plans):
                while next_plan < len(plans) and len(pending) < LOOKAHEAD_BATCHES * batch_size:
                    pending.append((next_plan, loaders.submit(self._load_and_prepare, plans[next_plan])))
                    next_plan += 1
                index, future = pending.popleft()
                loaded = future.result()
                if isinstance(loaded, str):
                    outcomes[index] = self._failed(plans[index], loaded)
                else:
                    batch.append((index, *loaded))
                if len(batch) == batch_size or (batch and not pending and next_plan == len(plans)):
                    encoded.extend(self._run_batch(batch, plans, request, cache_embeddings, encoders))
                    batch = []
                    batch_size = self._batch_size()
            for index, future in encoded:
                outcomes[index] = future.result()
        return outcomes  # type: ignore[return-value]

    def _batch_size(self) -> int:
        """The engine's batch size once it is loaded (BATCH_SIZE=auto), else the configured one."""
        if self._engine is not None:
            return getattr(self._engine, "batch_size", None) or 8
        return self.settings.batch_size or 8

    def _load_and_prepare(self, plan: TaskPlan):
        """(LoadedImage, PreparedImage) for a plan, or the reason it has none (safe to log)."""
        with self.metrics.stage_seconds.labels("images").time():
            loaded = self._load(plan)
        if isinstance(loaded, str):
            return loaded
        engine = self.engine()
        with self.metrics.stage_seconds.labels("prepare").time():
            return loaded, engine.prepare(loaded.image)

    def _run_batch(self, batch, plans, request, cache_embeddings, encoders):
        keys = [loaded.sha256 for _, loaded, _ in batch] if cache_embeddings else None
        with self.metrics.stage_seconds.labels("engine").time():
            results = self.engine().run([prepared for _, _, prepared in batch],
                                        [plans[i].phrases for i, _, _ in batch], keys)
        return [(index, encoders.submit(self._regions, plans[index], result, request))
                for (index, _, _), result in zip(batch, results)]

    def _regions(self, plan: TaskPlan, result, request: PredictRequest) -> TaskOutcome:
        with self.metrics.stage_seconds.labels("regions").time():
            prediction, stats = build_prediction(result, request.config, self.model_version)
        self._count(plan, prediction, stats)
        return TaskOutcome(prediction)

    def _failed(self, plan: TaskPlan, reason: str) -> TaskOutcome:
        self.metrics.tasks.labels("no_image" if plan.error else "image_error").inc()
        log.warning("task %s: empty prediction: %s", plan.task_id, reason)
        return TaskOutcome(empty_prediction(self.model_version), reason)

    def _refine_all(self, plans: list[TaskPlan], request: PredictRequest, smart) -> list[TaskOutcome]:
        """Smart-tool clicks/boxes (with the text prompt's detections when the context has text)."""
        text = prompt_text(request.context, request.config)
        with ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(plans)) or 1) as loaders:
            loaded = list(loaders.map(self._load, plans))
        outcomes = []
        for plan, item in zip(plans, loaded):
            if isinstance(item, str):
                outcomes.append(self._failed(plan, item))
                continue
            with self.metrics.stage_seconds.labels("refine").time():
                prediction, stats = refine_image(self.engine(), item, request.config, smart,
                                                 plan.phrases if text else None, self.model_version)
            outcomes.append(TaskOutcome(prediction))
            self._count(plan, prediction, stats)
        return outcomes

    def _count(self, plan: TaskPlan, prediction: dict, stats) -> None:
        self.metrics.tasks.labels("ok").inc()
        for region in prediction["result"]:
            self.metrics.regions.labels(region["type"]).inc()
        dropped = sum(stats.dropped_phrases.values())
        if dropped:
            self.metrics.dropped_detections.inc(dropped)
            log.info("task %s: dropped %d detections whose phrase maps to no label (%s)", plan.task_id,
                     dropped, ", ".join(sorted(stats.dropped_phrases)))
        log.info("task %s: %d regions", plan.task_id, stats.regions)

    def _load(self, plan: TaskPlan) -> LoadedImage | str:
        """The plan's image, or the reason it has none (safe to log: no tokens, no bodies)."""
        if plan.error:
            return plan.error
        try:
            return self.loader.load(plan.image_url)
        except ImageError as exc:
            return exc.reason
