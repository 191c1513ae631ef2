"""Queue mode (``REDIS_URL`` set): this process validates and enqueues; RQ workers run the models.

Never imports torch: the pipeline modules are imported only for their torch-free helpers
(model version, prompt limits, the warm request).
"""

from __future__ import annotations

import logging
from dataclasses import replace

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
from backend.errors import EngineNotServed
from backend.ls.options import PredictOptions
from backend.ls.engines import check_choice, choose_engine, engine_state
from backend.queue.errors import NoWorkerListening, QueueError, QueueUnavailable
from backend.queue.liveness import WorkerInfo, live_model_versions, live_worker_info
from backend.queue.prewarm import publish_warm
from backend.settings import DEFAULT_BATCH_SIZE, Settings

log = logging.getLogger(__name__)


class QueueBackend:
    """Interactive predictions are RQ jobs on the project's engine's queues (one per engine batch of
    tasks, so several workers share a large request; a one-task job goes to the worker that owns the
    task, :mod:`backend.queue.affinity`); bulk runs are supervised from this process; project
    settings live in Redis, shared by every web process, worker and CLI. ``model_version`` is the
    default engine's as this process's settings name it; predictions carry their worker's."""

    mode = Mode.QUEUE

    def __init__(self, settings: Settings):
        self.default_engine = settings.engine.value
        self.model_version = model_version(settings)
        self.limits = prompt_limits(settings)
        self.metrics = Metrics()
        self.queue = QueueClient(settings.redis_url, settings.predict_timeout,
                                 chunk_size=settings.batch_size or DEFAULT_BATCH_SIZE,
                                 affinity_max_queue=settings.affinity_max_queue if settings.click_affinity else None)
        self.runs = QueueRuns(settings, self.queue.connection)
        self.projects = RedisProjectStore(self.queue.connection, remember=settings.remember_prompt)
        self.prewarm_tasks = settings.prewarm_tasks

    def _live(self, connection=None) -> dict[str, WorkerInfo]:
        try:
            return live_worker_info(connection or self.queue.connection)
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis is unreachable ({type(exc).__name__}): check REDIS_URL") from None

    @staticmethod
    def _served(live: dict[str, WorkerInfo]) -> dict[str, list[str]]:
        served: dict[str, set[str]] = {}
        for info in live.values():
            served.setdefault(info.engine, set()).add(info.model_version)
        return {engine: sorted(versions) for engine, versions in served.items()}

    def engine_for(self, options: PredictOptions, live: dict[str, WorkerInfo] | None = None) -> str:
        return choose_engine(options, self.default_engine, self._served(self._live() if live is None else live))

    def _workers(self, options: PredictOptions) -> tuple[str, list[str]]:
        """The project's engine and its live workers; EngineNotServed (503) when none is live."""
        live = self._live()
        engine = self.engine_for(options, live)
        workers = sorted(name for name, info in live.items() if info.engine == engine)
        if not workers:
            raise EngineNotServed(f"no live worker serves engine {engine!r}: start one with "
                                  f"`ENGINE={engine} python -m backend worker` (same REDIS_URL)")
        return engine, workers

    def served(self) -> dict[str, list[str]]:
        """Engine -> the model versions its live workers serve ({} when Redis is unreachable)."""
        try:
            return self._served(live_worker_info(self.queue.health_connection))
        except redis.RedisError as exc:
            log.warning("listing the live engines: Redis unreachable (%s)", type(exc).__name__)
            return {}

    def engine_state(self, options: PredictOptions) -> dict:
        return engine_state(options, self.default_engine, self.served())

    def check_choice(self, options: PredictOptions) -> None:
        """Any engine may be chosen (its workers may start later; /predict answers 503 until one is
        live); a ``model_version`` must be one a live worker serves."""
        served = self._served(self._live())  # one Redis read for both checks
        check_choice(options, served, None, "")
        if options.engine is not None and options.model_version is None and options.engine not in served:
            log.warning("setup: no live worker serves engine %r yet; its projects get 503 until one starts",
                        options.engine)

    def predict(self, request: PredictRequest) -> list[dict]:
        plan_tasks(request, self.limits)  # a bad prompt is a 400 here, not a failed job
        engine, workers = self._workers(request.options)
        return self.queue.predict(request, engine, workers)

    def versions(self) -> list[str]:
        """This process's version, then the other versions live workers serve (several engines, a
        rolling upgrade)."""
        try:
            live = live_model_versions(self.queue.health_connection)
        except redis.RedisError as exc:  # LS only fills a drop-down with it: answer what is known
            log.warning("/versions: Redis unreachable (%s); answering this process's version", type(exc).__name__)
            live = {}
        return [self.model_version, *sorted(v for v in live if v != self.model_version)]

    def health(self) -> dict:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version,
                "mode": self.mode.value, "engine": self.default_engine, **self.queue.health()}

    def preload(self) -> None:
        """Nothing to load here: the workers keep the models."""

    def prewarm(self, project: int, request: PredictRequest) -> None:
        """After a /predict for one task of ``project``: ask the workers of its engine to encode its
        next PREWARM_TASKS tasks, each the tasks it owns (:mod:`backend.queue.prewarm`); returns at
        once, never fails the call."""
        warm = after_predict(project, request, self.prewarm_tasks)
        if warm is None:
            return
        try:
            publish_warm(self.queue.connection, replace(warm, engine=self.engine_for(request.options)))
        except (redis.RedisError, QueueError, EngineNotServed) as exc:  # best effort: the predictions are made
            log.warning("pre-warming project %d not sent (%s)", project, type(exc).__name__)

    def warm(self, project: int, count: int, after: int | None = None, options: PredictOptions = PredictOptions()) \
            -> dict:
        """Ask the workers of the project's engine to encode ``project``'s first ``count`` tasks
        after ``after`` (POST /warm), each the tasks it owns; each reads the label config from LS
        and encodes in the background: ``{"workers": how many took the request}``."""
        engine = self.engine_for(options)
        try:
            workers = publish_warm(self.queue.connection, WarmRequest(project, after, count, engine=engine))
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis is unreachable ({type(exc).__name__}): check REDIS_URL") from None
        if workers == 0:
            raise NoWorkerListening("no worker is listening for warm requests: start `python -m backend worker` "
                                    "with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set (it reads the tasks from LS)")
        return {"workers": workers}
