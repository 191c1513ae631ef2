"""Queue mode (``REDIS_URL`` set): this process validates and enqueues; RQ workers run the models.

Never imports torch: the pipeline module is imported only for its torch-free helpers
(model version, prompt limits).
"""

from __future__ import annotations

from backend.bulk.runs import QueueRuns
from backend.ls.tasks import PredictRequest, plan_tasks
from backend.metrics import Metrics
from backend.modes.base import MODEL_CLASS, Mode
from backend.pipeline.predict import model_version, prompt_limits
from backend.queue.client import QueueClient
from backend.settings import DEFAULT_BATCH_SIZE, Settings


class QueueBackend:
    """Interactive predictions are RQ jobs on ``interactive`` (one per engine batch of tasks, so
    several workers share a large request); bulk runs are supervised from this process."""

    mode = Mode.QUEUE

    def __init__(self, settings: Settings):
        self.model_version = model_version(settings)
        self.limits = prompt_limits(settings)
        self.metrics = Metrics()
        self.queue = QueueClient(settings.redis_url, settings.predict_timeout,
                                 chunk_size=settings.batch_size or DEFAULT_BATCH_SIZE)
        self.runs = QueueRuns(settings, self.queue.connection)

    def predict(self, request: PredictRequest) -> list[dict]:
        plan_tasks(request, self.limits)  # a bad prompt is a 400 here, not a failed job
        return self.queue.predict(request)

    def health(self) -> dict:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version,
                "mode": self.mode.value, **self.queue.health()}

    def preload(self) -> None:
        """Nothing to load here: the workers keep the models."""
