"""Queue mode (``REDIS_URL`` set): this process validates and enqueues; RQ workers run the models.

Never imports torch: the pipeline module is imported only for its torch-free helpers
(model version, prompt limits).
"""

from __future__ import annotations

import logging

import redis

from backend.bulk.runs import QueueRuns
from backend.ls.tasks import PredictRequest, plan_tasks
from backend.metrics import Metrics
from backend.modes.base import MODEL_CLASS, Mode
from backend.modes.projects import RedisProjectStore
from backend.modelinfo import model_version
from backend.pipeline.predict import prompt_limits
from backend.queue.client import QueueClient
from backend.queue.errors import NotInQueueMode
from backend.queue.liveness import live_model_versions
from backend.settings import DEFAULT_BATCH_SIZE, Settings

log = logging.getLogger(__name__)


class QueueBackend:
    """Interactive predictions are RQ jobs on ``interactive`` (one per engine batch of tasks, so
    several workers share a large request); bulk runs are supervised from this process; project
    settings live in Redis, shared by every web process, worker and CLI."""

    mode = Mode.QUEUE

    def __init__(self, settings: Settings):
        self.model_version = model_version(settings)
        self.limits = prompt_limits(settings)
        self.metrics = Metrics()
        self.queue = QueueClient(settings.redis_url, settings.predict_timeout,
                                 chunk_size=settings.batch_size or DEFAULT_BATCH_SIZE)
        self.runs = QueueRuns(settings, self.queue.connection)
        self.projects = RedisProjectStore(self.queue.connection, remember=settings.remember_prompt)

    def predict(self, request: PredictRequest) -> list[dict]:
        plan_tasks(request, self.limits)  # a bad prompt is a 400 here, not a failed job
        return self.queue.predict(request)

    def versions(self) -> list[str]:
        """This process's version, then the other versions live workers serve (a rolling upgrade)."""
        try:
            live = live_model_versions(self.queue.health_connection)
        except redis.RedisError as exc:  # LS only fills a drop-down with it: answer what is known
            log.warning("/versions: Redis unreachable (%s); answering this process's version", type(exc).__name__)
            live = {}
        return [self.model_version, *sorted(v for v in live if v != self.model_version)]

    def health(self) -> dict:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version,
                "mode": self.mode.value, **self.queue.health()}

    def preload(self) -> None:
        """Nothing to load here: the workers keep the models."""

    def prewarm(self, project: int, request: PredictRequest) -> None:
        """Nothing: each worker holds its own embedding cache and a click may reach any of them."""

    def warm(self, project: int, count: int, after: int | None = None) -> int:
        raise NotInQueueMode("pre-warming runs in embedded mode only: in queue mode each worker holds its own "
                             "embedding cache")
