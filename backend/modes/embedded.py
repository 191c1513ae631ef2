"""Embedded mode (no ``REDIS_URL``): the pipeline, its models and bulk runs live in this process."""

from __future__ import annotations

import threading
from dataclasses import replace

from backend.bulk.runs import EmbeddedRuns
from backend.errors import EngineNotServed, ModelLoadError
from backend.ls.options import PredictOptions
from backend.ls.engines import check_choice, choose_engine, engine_state
from backend.modelinfo import model_sources
from backend.ls.tasks import PredictRequest
from backend.modes.base import MODEL_CLASS, Mode
from backend.modes.projects import MemoryProjectStore
from backend.pipeline.predict import Pipeline
from backend.pipeline.prewarm import Prewarmer, WarmRequest, after_predict
from backend.settings import Settings


class EmbeddedBackend:
    """Predictions run on this process's :class:`Pipeline` of the project's engine (one per engine
    of ENGINES, each loading its models on first use or by :meth:`preload`); bulk runs go chunk
    after chunk in a thread of this process. Project settings live in this process's memory (LS
    sends them again with its next ``/setup``).

    ``pipeline``: the default engine's (ENGINE), or one to share; the others are built here on
    ``settings`` with their engine, and share its metrics registry."""

    mode = Mode.EMBEDDED

    def __init__(self, settings: Settings, pipeline: Pipeline | None = None):
        self.settings = settings
        self.pipeline = pipeline or Pipeline(settings)
        self.pipelines = {settings.engine.value: self.pipeline}
        for kind in settings.engines:
            if kind.value not in self.pipelines:
                self.pipelines[kind.value] = Pipeline(replace(settings, engine=kind), metrics=self.pipeline.metrics)
        self.model_version = self.pipeline.model_version
        self.limits = self.pipeline.limits
        self.metrics = self.pipeline.metrics
        self.runs = EmbeddedRuns(settings, self.pipeline, pipelines=self.pipelines)
        self.projects = MemoryProjectStore(remember=settings.remember_prompt)
        # Pre-warming reads the next tasks through the LS API: without credentials there is none.
        self.prewarmers = {engine: Prewarmer(pipeline) for engine, pipeline in self.pipelines.items()} \
            if settings.has_label_studio_credentials else {}

    def served(self) -> dict[str, list[str]]:
        """Engine -> the model versions it serves (one pipeline each)."""
        return {engine: [pipeline.model_version] for engine, pipeline in self.pipelines.items()}

    def engine_for(self, options: PredictOptions) -> str:
        return choose_engine(options, self.settings.engine.value, self.served())

    def pipeline_for(self, options: PredictOptions) -> Pipeline:
        """The pipeline of the project's engine; EngineNotServed (503) for one not in ENGINES."""
        engine = self.engine_for(options)
        if engine not in self.pipelines:
            raise EngineNotServed(f"engine {engine!r} is not loaded by this process (ENGINES="
                                  f"{','.join(self.pipelines)}): add it to ENGINES and restart")
        return self.pipelines[engine]

    def engine_state(self, options: PredictOptions) -> dict:
        return engine_state(options, self.settings.engine.value, self.served())

    def check_choice(self, options: PredictOptions) -> None:
        check_choice(options, self.served(), self.pipelines,
                     f"this process loads ENGINES={','.join(self.pipelines)}; add it to ENGINES and restart "
                     "(each engine keeps its models in memory)")

    def prewarm(self, project: int, request: PredictRequest) -> None:
        """After a /predict for one task of ``project``: encode its next PREWARM_TASKS tasks'
        embeddings in the background (see :mod:`backend.pipeline.prewarm`); returns at once."""
        warm = after_predict(project, request, self.settings.prewarm_tasks)
        if self.prewarmers and warm is not None:
            self.prewarmers[self.engine_for(request.options)].submit(warm)

    def warm(self, project: int, count: int, after: int | None = None, options: PredictOptions = PredictOptions()) \
            -> dict:
        """Encode ``project``'s first ``count`` tasks after ``after`` now (POST /warm), with the
        project's engine: ``{"encoded": how many}``."""
        if not self.prewarmers:
            raise ValueError(Settings.LS_CREDENTIALS_NEEDED.replace("pre-label projects", "pre-warm tasks"))
        return {"encoded": self.prewarmers[self.engine_for(options)].warm(WarmRequest(project, after, count))}

    def predict(self, request: PredictRequest) -> list[dict]:
        return self.pipeline_for(request.options).predict(request)

    def versions(self) -> list[str]:
        return [self.model_version, *(p.model_version for p in self.pipelines.values() if p is not self.pipeline)]

    def health(self) -> dict:
        """UP, or DOWN with the reason when the default engine's models cannot be loaded (/health
        answers 503); DEGRADED when another engine's (or the video models) cannot."""
        state = {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version,
                 "mode": self.mode.value, "engine": self.settings.engine.value, "models": model_sources(self.settings),
                 "engines": {engine: {"model_versions": [pipeline.model_version],
                                      "models": model_sources(pipeline.settings)}
                             for engine, pipeline in self.pipelines.items()}}
        others = [p for p in self.pipelines.values() if p is not self.pipeline and p.load_error is not None]
        if self.pipeline.load_error is not None:
            state.update(status="DOWN", reason=self.pipeline.load_error.reason)
        elif others:  # projects of the default engine still work
            state.update(status="DEGRADED", reason=others[0].load_error.reason)
        elif self.pipeline.video_load_error is not None:  # image projects still work; video ones do not
            state.update(status="DEGRADED", reason=self.pipeline.video_load_error.reason)
        return state

    def preload(self) -> None:
        threading.Thread(target=self._load, name="preload-models", daemon=True).start()

    def _load(self) -> None:
        for pipeline in self.pipelines.values():
            try:
                pipeline.engine()
            except ModelLoadError:
                pass  # logged with its fix by Pipeline.engine; /health and /predict report it
