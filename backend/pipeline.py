"""One predict call through the stages: tasks → images → engine → regions.

The pipeline owns the long-lived parts of a process: the engine (models, created once on first
use, under a lock), the image loader and the metrics. Each call only reads them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from backend.images import FetchSettings, ImageError, ImageLoader, LoadedImage
from backend.metrics import Metrics
from backend.regions import build_prediction, empty_prediction
from backend.settings import Settings
from backend.refine import refine_image
from backend.smartprompt import parse_smart_prompt
from backend.tasks import PredictRequest, PromptLimits, TaskPlan, plan_tasks, prompt_text

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8


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
        outcomes: list[TaskOutcome] = []
        chunk = 4 * (self.settings.batch_size or 8)  # bounds the images and masks held at once
        for start in range(0, len(plans), chunk):
            outcomes.extend(self._predict_chunk(plans[start:start + chunk], request))
        return outcomes

    def _predict_chunk(self, plans: list[TaskPlan], request: PredictRequest) -> list[TaskOutcome]:
        with self.metrics.stage_seconds.labels("images").time():
            loaded = self._load_images(plans)
        ready = [i for i, item in enumerate(loaded) if isinstance(item, LoadedImage)]
        outcomes = [TaskOutcome(empty_prediction(self.model_version), None if i in ready else loaded[i])
                    for i in range(len(plans))]
        for i, item in enumerate(loaded):
            if not isinstance(item, LoadedImage):
                outcome = "no_image" if plans[i].error else "image_error"
                self.metrics.tasks.labels(outcome).inc()
                log.warning("task %s: empty prediction: %s", plans[i].task_id, item)
        if not ready:
            return outcomes
        engine = self.engine()
        smart = parse_smart_prompt(request.context, request.config)
        if smart:
            return self._refine(engine, plans, loaded, ready, outcomes, request, smart)
        # Interactive calls (with a context) cache SAM embeddings: the annotator may click next.
        keys = [loaded[i].sha256 for i in ready] if request.context is not None else None
        with self.metrics.stage_seconds.labels("engine").time():
            results = engine.run([loaded[i].image for i in ready], [plans[i].phrases for i in ready], keys)
        with self.metrics.stage_seconds.labels("regions").time():
            for i, result in zip(ready, results):
                prediction, stats = build_prediction(result, request.config, self.model_version)
                outcomes[i] = TaskOutcome(prediction)
                self._count(plans[i], prediction, stats)
        return outcomes

    def _refine(self, engine, plans, loaded, ready, outcomes, request, smart) -> list[TaskOutcome]:
        """Smart-tool clicks/boxes (with the text prompt's detections when the context has text)."""
        text = prompt_text(request.context, request.config)
        for i in ready:
            with self.metrics.stage_seconds.labels("refine").time():
                prediction, stats = refine_image(engine, loaded[i], request.config, smart,
                                                 plans[i].phrases if text else None, self.model_version)
            outcomes[i] = TaskOutcome(prediction)
            self._count(plans[i], prediction, stats)
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

    def _load_images(self, plans: list[TaskPlan]) -> list[LoadedImage | str]:
        """Per plan a LoadedImage, or the reason it has none (safe to log: no tokens, no bodies)."""
        def load(plan: TaskPlan) -> LoadedImage | str:
            if plan.error:
                return plan.error
            try:
                return self.loader.load(plan.image_url)
            except ImageError as exc:
                return exc.reason

        if len(plans) == 1:
            return [load(plans[0])]
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, len(plans))) as pool:
            return list(pool.map(load, plans))
