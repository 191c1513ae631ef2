"""Queue mode (``REDIS_URL`` set): this process validates and enqueues; RQ workers run the models.

Never imports torch: the pipeline modules are imported only for their torch-free helpers
(model version, prompt limits, the warm request).
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
from backend.pipeline.prewarm import WarmRequest, after_predict
from backend.queue.client import QueueClient
from backend.queue.errors import NoWorkerListening, QueueUnavailable
from backend.queue.liveness import live_model_versions
from backend.queue.prewarm import publish_warm
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
        self.prewarm_tasks = settings.prewarm_tasks

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
        """After a /predict for one task of ``project``: ask every worker to encode its next
        PREWARM_TASKS tasks (:mod:`backend.queue.prewarm`); returns at once, never fails the call."""
        warm = after_predict(project, request, self.prewarm_tasks)
        if warm is None:
            return
        try:
            publish_warm(self.queue.connection, warm)
        except redis.RedisError as exc:  # the predictions are already made: pre-warming is best effort
            log.warning("pre-warming project %d not sent: Redis unreachable (%s)", project, type(exc).__name__)

    def warm(self, project: int, count: int, after: int | None = None) -> dict:
        """Ask every worker to encode ``project``'s first ``count`` tasks after ``after`` (POST
        /warm); each reads the label config from LS and encodes in the background:
        ``{"workers": how many took the request}``."""
        try:
            workers = publish_warm(self.queue.connection, WarmRequest(project, after, count))
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis is unreachable ({type(exc).__name__}): check REDIS_URL") from None
        if workers == 0:
            raise NoWorkerListening("no worker is listening for warm requests: start `python -m backend worker` "
                                    "with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set (it reads the tasks from LS)")
        return {"workers": workers}
