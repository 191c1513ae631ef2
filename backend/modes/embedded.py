"""Embedded mode (no ``REDIS_URL``): the pipeline, its models and bulk runs live in this process."""

from __future__ import annotations

import threading

from backend.bulk.runs import EmbeddedRuns
from backend.errors import ModelLoadError
from backend.modelinfo import model_sources
from backend.ls.tasks import PredictRequest
from backend.modes.base import MODEL_CLASS, Mode
from backend.modes.projects import MemoryProjectStore
from backend.pipeline.predict import Pipeline
from backend.pipeline.prewarm import Prewarmer, WarmRequest, after_predict
from backend.settings import Settings


class EmbeddedBackend:
    """Predictions run on this process's :class:`Pipeline` (models loaded on first use, or by
    :meth:`preload`); bulk runs go chunk after chunk in a thread of this process. Project settings
    live in this process's memory (LS sends them again with its next ``/setup``)."""

    mode = Mode.EMBEDDED

    def __init__(self, settings: Settings, pipeline: Pipeline | None = None):
        self.settings = settings
        self.pipeline = pipeline or Pipeline(settings)
        self.model_version = self.pipeline.model_version
        self.limits = self.pipeline.limits
        self.metrics = self.pipeline.metrics
        self.runs = EmbeddedRuns(settings, self.pipeline)
        self.projects = MemoryProjectStore(remember=settings.remember_prompt)
        # Pre-warming reads the next tasks through the LS API: without credentials there is none.
        self.prewarmer = Prewarmer(self.pipeline) if settings.has_label_studio_credentials else None

    def prewarm(self, project: int, request: PredictRequest) -> None:
        """After a /predict for one task of ``project``: encode its next PREWARM_TASKS tasks'
        embeddings in the background (see :mod:`backend.pipeline.prewarm`); returns at once."""
        warm = after_predict(project, request, self.settings.prewarm_tasks)
        if self.prewarmer is not None and warm is not None:
            self.prewarmer.submit(warm)

    def warm(self, project: int, count: int, after: int | None = None) -> dict:
        """Encode ``project``'s first ``count`` tasks after ``after`` now (POST /warm):
        ``{"encoded": how many}``."""
        if self.prewarmer is None:
            raise ValueError(Settings.LS_CREDENTIALS_NEEDED.replace("pre-label projects", "pre-warm tasks"))
        return {"encoded": self.prewarmer.warm(WarmRequest(project, after, count))}

    def predict(self, request: PredictRequest) -> list[dict]:
        return self.pipeline.predict(request)

    def versions(self) -> list[str]:
        return [self.model_version]

    def health(self) -> dict:
        """UP, or DOWN with the reason when the models cannot be loaded (/health answers 503)."""
        state = {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version,
                 "mode": self.mode.value, "engine": self.settings.engine.value, "models": model_sources(self.settings)}
        if self.pipeline.load_error is not None:
            state.update(status="DOWN", reason=self.pipeline.load_error.reason)
        elif self.pipeline.video_load_error is not None:  # image projects still work; video ones do not
            state.update(status="DEGRADED", reason=self.pipeline.video_load_error.reason)
        return state

    def preload(self) -> None:
        threading.Thread(target=self._load, name="preload-models", daemon=True).start()

    def _load(self) -> None:
        try:
            self.pipeline.engine()
        except ModelLoadError:
            pass  # logged with its fix by Pipeline.engine; /health and /predict report it
