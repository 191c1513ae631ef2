"""Queue mode: RQ queues, the job functions workers run, and the web side that enqueues and waits.

Two queues, served in this order by every worker: ``interactive`` (an annotator or LS is waiting on
the HTTP call) and ``prelabel`` (bulk runs). The web process imports this module but never torch:
job functions reach the models only through the worker's resident pipeline.

Liveness: RQ notices a dead non-forking worker only after its job's timeout + 60 s. Workers here
also keep an entry in the ``gsam:workers`` sorted set (score = when it expires, refreshed every few
seconds); a started job whose worker has no live entry is handed to RQ's own abandoned-job
handling, which re-queues it while it has retries left.

Trust boundary: anyone who can write to Redis can push jobs. So nothing here is pickled (jobs,
arguments, results and meta cross Redis as JSON, :data:`SERIALIZER`), and a worker runs only the job
functions named in :data:`JOB_FUNCTIONS`, never callbacks or webhooks (:class:`GsamJob`). Every
queue, job and registry object is built by :func:`queue` / :func:`fetch_job` / :func:`fetch_jobs`
so no code path falls back to RQ's pickle default.

Keys: interactive jobs expire (``ttl`` while queued, ``result_ttl``/``failure_ttl`` once ended) and
are deleted when the web process stops waiting for them; ``gsam:workers`` expires when no worker
refreshes it; ``gsam:reaper-lock`` is set with PX.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

INTERACTIVE, PRELABEL = "interactive", "prelabel"
QUEUES = (INTERACTIVE, PRELABEL)
WORKERS_KEY = "gsam:workers"
ALIVE_TTL_S = 15
PRELABEL_JOB_TIMEOUT_S = 900
PRELABEL_RETRY = Retry(max=3, interval=[5, 20, 60])
RESULT_TTL_S = 600
#: How long ``gsam:workers`` outlives the last heartbeat of any worker (all its entries are stale by then).
WORKERS_KEY_TTL_S = 4 * ALIVE_TTL_S
#: The one serializer of every queue, job, result and meta: JSON, so reading Redis never runs code.
SERIALIZER = JSONSerializer


class QueueError(RuntimeError):
    """A queue-mode failure; ``http_status`` is what the web layer answers."""

    http_status = 500


class QueueUnavailable(QueueError):
    """Redis cannot be reached."""

    http_status = 503


class QueueTimeout(QueueError):
    """No worker answered in time."""

    http_status = 504


class JobFailed(QueueError):
    """A worker ran the job and it raised."""

    http_status = 502


class UnsafeJobError(RuntimeError):
    """A job in Redis names a function that is not one of this backend's job functions."""


class GsamJob(Job):
    """An RQ job that can run only :data:`JOB_FUNCTIONS`.

    RQ resolves ``func_name`` with an import (``os.system`` would do) and would also import and call
    success/failure/stopped callbacks and send webhooks named in the job hash. We enqueue none of
    those, so a job that carries them was not written by us: its function is refused (the job
    fails with the reason), and callbacks and webhooks are never run.
    """

    @property
    def func(self):
        name = self.func_name  # DeserializationError for a non-JSON (e.g. pickled) payload: the job fails
        function = JOB_FUNCTIONS.get(name) if isinstance(name, str) else None
        if function is None or self.instance is not None:
            raise UnsafeJobError(f"refused job {self.id}: {name!r} is not a job function of this backend "
                                 f"(allowed: {', '.join(sorted(JOB_FUNCTIONS))})")
        return function

    def _refuse_callback(self, kind: str, name: str | None) -> None:
        if name:
            log.warning("job %s: ignoring its %s callback %r (this backend runs no callbacks)", self.id, kind, name)

    @property
    def success_callback(self):
        self._refuse_callback("success", self._success_callback_name)
        return None

    @property
    def failure_callback(self):
        self._refuse_callback("failure", self._failure_callback_name)
        return None

    @property
    def stopped_callback(self):
        self._refuse_callback("stopped", self._stopped_callback_name)
        return None

    def send_webhooks(self, status, *, exc_string=None) -> None:
        if self.webhooks:
            log.warning("job %s: not sending its %d webhook(s) (this backend sends none)", self.id, len(self.webhooks))


def queue(name: str, connection: redis.Redis) -> Queue:
    """An RQ queue with this module's serializer and job class (never RQ's pickle default)."""
    return Queue(name, connection=connection, serializer=SERIALIZER, job_class=GsamJob)


def fetch_job(job_id: str, connection: redis.Redis) -> GsamJob:
    return GsamJob.fetch(job_id, connection=connection, serializer=SERIALIZER)


def fetch_jobs(job_ids: list[str], connection: redis.Redis) -> list[GsamJob | None]:
    return GsamJob.fetch_many(job_ids, connection=connection, serializer=SERIALIZER)


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30)


# ---------------------------------------------------------------- worker liveness

def mark_alive(connection: redis.Redis, worker_name: str, ttl_s: float = ALIVE_TTL_S) -> None:
    now = time.time()
    with connection.pipeline() as pipe:
        pipe.zadd(WORKERS_KEY, {worker_name: now + ttl_s})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - 3600)  # forget workers dead for an hour
        pipe.expire(WORKERS_KEY, WORKERS_KEY_TTL_S)  # gone with the last worker: a missing entry reads as dead
        pipe.execute()


def mark_gone(connection: redis.Redis, worker_name: str) -> None:
    connection.zrem(WORKERS_KEY, worker_name)


def live_workers(connection: redis.Redis) -> int:
    return int(connection.zcount(WORKERS_KEY, time.time(), "+inf"))


def is_alive(connection: redis.Redis, worker_name: str) -> bool:
    expires = connection.zscore(WORKERS_KEY, worker_name)
    return expires is not None and expires > time.time()


def requeue_abandoned(connection: redis.Redis) -> list[str]:
    """Re-queue (at the front) the started jobs of dead workers. Returns their ids.

    No backoff: a worker's death is not the job's fault, and RQ's scheduled retries would wait for
    a scheduler whose lock the dead worker may still hold. Each re-queue spends one retry, so a job
    that keeps killing workers ends; one without retries left goes through RQ's own abandoned-job
    handling (recorded as failed).
    """
    abandoned = []
    for name in QUEUES:
        registry = StartedJobRegistry(name, connection=connection, job_class=GsamJob, serializer=SERIALIZER)
        out_of_retries = []
        for entry in connection.zrange(registry.key, 0, -1):
            job_id = registry.parse_job_id(entry)
            try:
                job = fetch_job(job_id, connection)
            except NoSuchJobError:
                continue
            if not job.worker_name or is_alive(connection, job.worker_name):
                continue
            abandoned.append(job_id)
            if (job.retries_left or 0) > 0:
                connection.zrem(registry.key, entry)
                job.retries_left -= 1
                job.save()
                queue(job.origin, connection).enqueue_job(job, at_front=True)
            else:
                out_of_retries.append(entry)
        if out_of_retries:
            connection.zadd(registry.key, {entry: 0 for entry in out_of_retries}, xx=True)
            registry.cleanup(timestamp=1)
    if abandoned:
        log.warning("re-queued or failed %d job(s) of dead workers: %s", len(abandoned), ", ".join(abandoned))
    return abandoned


# ---------------------------------------------------------------- job functions (run in a worker)

def predict_payload(body: dict) -> tuple[dict, list[dict]]:
    """What a ``predict_job`` needs from a validated LS /predict body: ``(shared, tasks)``.

    ``shared`` = ``{"label_config", "context", "project"}`` (the context taken where
    :func:`backend.ls.tasks.parse_predict_request` takes it: ``params.context``, else a top-level
    ``context``); each task is cut to ``{"id", "data"}`` (LS also sends its annotations, drafts and
    predictions, which the worker never reads). A chunk's job argument is ``{**shared, "tasks": [...]}``.
    """
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    context = params.get("context") if isinstance(params.get("context"), dict) else None
    if context is None and isinstance(body.get("context"), dict):
        context = body["context"]
    shared = {"label_config": body.get("label_config"), "context": context, "project": body.get("project")}
    return shared, [{"id": task.get("id"), "data": task.get("data")} for task in body["tasks"]]


def predict_job(body: dict) -> list[dict]:
    """An LS /predict body (already validated by the web process) → one prediction per task."""
    from backend.ls.tasks import parse_predict_request
    from backend.queue.worker import resident_pipeline

    pipeline = resident_pipeline()
    return pipeline.predict(parse_predict_request(body, pipeline.limits))


#: The only functions a worker runs, by the import path RQ stores in a job's ``func_name``.
JOB_FUNCTIONS = {f"{function.__module__}.{function.__qualname__}": function
                 for function in (predict_job,)}
#: (``backend.bulk.chunkjob.prelabel_chunk_job`` is added by the worker process: queue never imports bulk.)


class QueueClient:
    """The web process's view of the queues: interactive predictions and health."""

    def __init__(self, redis_url: str, predict_timeout_s: float, chunk_size: int):
        self.connection = connect(redis_url)
        self.health_connection = connect(redis_url, timeout_s=0.5)  # /health must answer within 1 s
        self.predict_timeout_s = predict_timeout_s
        self.chunk_size = chunk_size

    def predict(self, body: dict) -> list[dict]:
        """Enqueue the tasks in chunks on ``interactive`` and wait for all of them, in task order.

        ``body`` is the LS /predict body the web process has already validated. Each job carries only
        what a worker needs (see :func:`predict_payload`), not the body again per chunk. When the
        wait ends without an answer, the jobs no worker has started are deleted; started ones end
        with their ``result_ttl``/``failure_ttl``.
        """
        shared, tasks = predict_payload(body)
        deadline = time.monotonic() + self.predict_timeout_s
        jobs: list[Job] = []
        try:
            interactive = queue(INTERACTIVE, self.connection)
            for i in range(0, len(tasks), self.chunk_size):
                jobs.append(interactive.enqueue(
                    predict_job, {**shared, "tasks": tasks[i:i + self.chunk_size]},
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
        """Delete (not just cancel: a cancelled job keeps its key) the jobs no worker has started."""
        not_started = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
        for job in jobs:
            try:
                if job.get_status() in not_started:
                    job.delete()
            except (InvalidJobOperation, NoSuchJobError):
                continue  # already gone (expired or deleted)
            except redis.RedisError as exc:
                log.warning("could not delete timed-out job %s (%s); it expires with its ttl", job.id,
                            type(exc).__name__)

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
        """Queue depths and live workers; never waits more than ~0.5 s on Redis."""
        try:
            with self.health_connection.pipeline() as pipe:
                for name in QUEUES:
                    pipe.llen(queue(name, self.health_connection).key)
                pipe.zcount(WORKERS_KEY, time.time(), "+inf")
                *depths, workers = pipe.execute()
        except redis.RedisError as exc:
            return {"status": "DEGRADED", "redis": f"unreachable ({type(exc).__name__})"}
        return {"status": "UP" if workers else "DEGRADED", "redis": "ok", "workers": int(workers),
                "queues": dict(zip(QUEUES, (int(d) for d in depths)))}


__all__ = ["GsamJob", "INTERACTIVE", "JOB_FUNCTIONS", "PRELABEL", "QueueClient", "QueueError", "QueueTimeout",
           "QueueUnavailable", "JobFailed", "SERIALIZER", "UnsafeJobError", "connect",
           "fetch_job", "fetch_jobs", "live_workers", "mark_alive", "mark_gone",
           "predict_job", "predict_payload", "queue", "requeue_abandoned"]


# ---------------------------------------------------------------- model versions the live workers serve

WORKER_VERSIONS_KEY = "gsam:worker-versions"
#: The version registry lives as long as the liveness set it is read with (refreshed every few seconds).
REGISTRY_TTL_S = WORKERS_KEY_TTL_S


def register_worker_version(connection: redis.Redis, worker_name: str, model_version: str) -> None:
    """Record the model version ``worker_name`` serves (a worker's housekeeping, every few seconds).

    ``gsam:worker-versions`` is a hash worker name -> version; which workers are alive is the
    ``gsam:workers`` sorted set. Both keys expire a minute after the last worker refreshed them, and
    entries of workers that left the liveness set are dropped here.
    """
    with connection.pipeline(transaction=False) as pipe:
        pipe.hset(WORKER_VERSIONS_KEY, worker_name, model_version)
        pipe.expire(WORKER_VERSIONS_KEY, REGISTRY_TTL_S)  # gsam:workers' own expiry is mark_alive's
        pipe.hkeys(WORKER_VERSIONS_KEY)
        names = pipe.execute()[-1]
    if names:
        scores = connection.zmscore(WORKERS_KEY, names)
        gone = [name for name, score in zip(names, scores) if score is None]
        if gone:
            connection.hdel(WORKER_VERSIONS_KEY, *gone)


def live_model_versions(connection: redis.Redis) -> dict[str, list[str]]:
    """Model version -> names of the live workers that serve it (workers that registered none are left out)."""
    names = [n.decode() if isinstance(n, bytes) else n
             for n in connection.zrangebyscore(WORKERS_KEY, time.time(), "+inf")]
    if not names:
        return {}
    versions: dict[str, list[str]] = {}
    for name, version in zip(names, connection.hmget(WORKER_VERSIONS_KEY, names)):
        if version is not None:
            versions.setdefault(version.decode() if isinstance(version, bytes) else version, []).append(name)
    return versions
