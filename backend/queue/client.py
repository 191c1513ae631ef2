"""The web process's side of the queues: interactive predictions (enqueue, wait, answer) and health.

:meth:`QueueClient.predict` takes the request the web process has already parsed and validated,
cuts it into chunks of ``chunk_size`` tasks, enqueues one :func:`backend.queue.jobs.predict_job`
per chunk on its engine's ``interactive`` queue (a one-task chunk on the queue of the worker that
owns the task, :mod:`backend.queue.affinity`) and waits for all of them, in task order. Failures are
:class:`QueueError` subclasses whose ``http_status`` is what the web layer answers.

Keys: interactive jobs expire (``ttl`` while queued, ``result_ttl``/``failure_ttl`` once ended) and
are deleted when this process stops waiting for them.
Imports the transport, the job function (by reference: no torch), ls's request type and the
connection helper.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from rq import Retry
from rq.job import Job, JobStatus
from rq.results import Result

from backend.ls.tasks import PredictRequest
from backend.queue import keys
from backend.queue.connection import connect
from backend.queue.errors import JobFailed, QueueTimeout, QueueUnavailable
from backend.queue.jobs import predict_job
from backend.queue.liveness import decode_load_errors, live_worker_info, shared_queues
from backend.queue.affinity import route, task_key
from backend.queue.transport import INTERACTIVE, drop_unstarted, engine_queue, queue

log = logging.getLogger(__name__)


def predict_payload(request: PredictRequest) -> tuple[dict, list[dict]]:
    """What a ``predict_job`` needs from a parsed request: ``(shared, tasks)``.

    ``shared`` = ``{"label_config", "context", "prompt"}`` (the config's XML as LS sent it), plus
    ``"options"`` (:meth:`PredictOptions.to_json`) when the project has any; each task is cut to
    ``{"id", "data"}`` (LS also sends its annotations, drafts and predictions, which the worker never
    reads). A chunk's job argument is ``{**shared, "tasks": [...]}``.
    """
    shared = {"label_config": request.config.xml, "context": request.context, "prompt": request.prompt}
    options = request.options.to_json()
    if options:  # no key for no options: the payload of a project without extra_params stays as it was
        shared["options"] = options
    return shared, [{"id": task.get("id"), "data": task.get("data")} for task in request.tasks]


class QueueClient:
    """The web process's view of the queues: interactive predictions and health."""

    def __init__(self, redis_url: str, predict_timeout_s: float, chunk_size: int, affinity_max_queue: int | None = 4):
        self.connection = connect(redis_url)
        self.health_connection = connect(redis_url, timeout_s=0.5)  # /health must answer within 1 s
        self.predict_timeout_s = predict_timeout_s
        self.chunk_size = chunk_size
        self.affinity_max_queue = affinity_max_queue  # None: no click affinity (every job to the shared queue)

    def _queue_for(self, engine: str, chunk: list[dict], workers: list[str]) -> str:
        """A one-task chunk goes to its owner (unless affinity is off or the owner is busy); larger
        chunks (Retrieve predictions: no embedding is kept) to the engine's shared queue."""
        if self.affinity_max_queue is None or len(chunk) != 1:
            return engine_queue(INTERACTIVE, engine)
        return route(self.connection, engine, task_key(chunk[0].get("id")), workers, self.affinity_max_queue)

    def predict(self, request: PredictRequest, engine: str, workers: list[str]) -> list[dict]:
        """Enqueue the request's tasks in chunks for ``engine`` (whose live workers are ``workers``)
        and wait for all of them, in task order.

        Each job carries only what a worker needs (see :func:`predict_payload`). When the wait ends
        without an answer, the jobs no worker has started are deleted; started ones end with their
        ``result_ttl``/``failure_ttl``.
        """
        shared, tasks = predict_payload(request)
        deadline = time.monotonic() + self.predict_timeout_s
        jobs: list[Job] = []
        try:
            for i in range(0, len(tasks), self.chunk_size):
                chunk = tasks[i:i + self.chunk_size]
                target = queue(self._queue_for(engine, chunk, workers), self.connection)
                jobs.append(target.enqueue(
                    predict_job, {**shared, "tasks": chunk},
                    job_timeout=int(self.predict_timeout_s) + 30, retry=Retry(max=1),
                    # ttl: a queued job nobody waits for any more expires even if this process dies
                    ttl=int(self.predict_timeout_s) + 60, result_ttl=60, failure_ttl=3600,
                    description=f"predict {len(tasks)} tasks"))
            results: list[dict] = []
            for job in jobs:
                results.extend(self._wait(job, deadline))
            return results
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis is unreachable ({type(exc).__name__}): check REDIS_URL") from None
        except QueueTimeout:
            self._drop_unstarted(jobs)
            raise

    @staticmethod
    def _drop_unstarted(jobs: list[Job]) -> None:
        """Delete the jobs no worker has started (:func:`~backend.queue.transport.drop_unstarted`)."""
        try:
            drop_unstarted(jobs)
        except redis.RedisError as exc:
            log.warning("could not delete timed-out jobs (%s); they expire with their ttl", type(exc).__name__)

    def _wait(self, job: Job, deadline: float) -> list[Any]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueTimeout(f"no worker finished the job within PREDICT_TIMEOUT={self.predict_timeout_s:g} s: "
                                   "check that `python -m backend worker` is running and not overloaded")
            try:
                result = job.latest_result(timeout=max(1, min(2, int(remaining))))
            except ValueError as exc:  # not JSON (e.g. pickle), bad base64: not written by our workers
                raise JobFailed(f"the result of job {job.id} is unreadable ({type(exc).__name__})") from None
            if result is None:
                continue
            if result.type == Result.Type.SUCCESSFUL:
                return result.return_value
            if result.type == Result.Type.FAILED and job.get_status() == JobStatus.FAILED:
                last_line = (result.exc_string or "").strip().splitlines()[-1:] or ["unknown error"]
                raise JobFailed(f"the worker failed on this request: {last_line[0]}")
            # a failed attempt that is being retried, or a retry result: keep waiting

    def health(self) -> dict:
        """Queue depths (each engine's shared queues), live workers, the engines they serve
        (``engines``: engine -> ``{"workers", "model_versions", "models": {version: checkpoints}}``) and the recent model-load errors
        of workers (``worker_errors``, latest first: a worker that cannot load its models exits, so
        only this tells why none is live; ``reason`` then repeats the latest); never waits more than
        ~0.5 s per Redis call."""
        now = time.time()
        names = shared_queues()
        try:
            with self.health_connection.pipeline() as pipe:
                for name in names:
                    pipe.llen(queue(name, self.health_connection).key)
                pipe.zcount(keys.WORKERS, now, "+inf")  # liveness.live_workers, in the same round trip
                pipe.zrevrangebyscore(keys.WORKER_ERRORS, "+inf", now)  # liveness.load_errors
                *depths, workers, errors = pipe.execute()
            live = live_worker_info(self.health_connection)
        except redis.RedisError as exc:
            return {"status": "DEGRADED", "redis": f"unreachable ({type(exc).__name__})"}
        engines: dict[str, dict] = {}
        for info in live.values():  # what each engine's live workers declare: versions and checkpoints
            entry = engines.setdefault(info.engine, {"workers": 0, "model_versions": [], "models": {}})
            entry["workers"] += 1
            if info.model_version not in entry["model_versions"]:
                entry["model_versions"] = sorted([*entry["model_versions"], info.model_version])
            entry["models"].setdefault(info.model_version, info.models)
        state = {"status": "UP" if workers else "DEGRADED", "redis": "ok", "workers": int(workers),
                 "engines": engines,
                 "queues": {name: int(depth) for name, depth in zip(names, depths)},
                 "worker_errors": decode_load_errors(errors)}
        if not workers and state["worker_errors"]:
            state["reason"] = f"no worker is live; a worker could not load its models: {state['worker_errors'][0]}"
        return state


__all__ = ["QueueClient", "predict_payload"]
