"""Queue mode: RQ queues, the job functions workers run, and the web side that enqueues and waits.

Two queues, served in this order by every worker: ``interactive`` (an annotator or LS is waiting on
the HTTP call) and ``prelabel`` (bulk runs). The web process imports this module but never torch:
job functions reach the models only through the worker's resident pipeline.

Liveness: RQ notices a dead non-forking worker only after its job's timeout + 60 s. Workers here
also keep an entry in the ``gsam:workers`` sorted set (score = when it expires, refreshed every few
seconds); a started job whose worker has no live entry is handed to RQ's own abandoned-job
handling, which re-queues it while it has retries left.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result

log = logging.getLogger(__name__)

INTERACTIVE, PRELABEL = "interactive", "prelabel"
QUEUES = (INTERACTIVE, PRELABEL)
WORKERS_KEY = "gsam:workers"
ALIVE_TTL_S = 15
PRELABEL_JOB_TIMEOUT_S = 900
PRELABEL_RETRY = Retry(max=3, interval=[5, 20, 60])
RESULT_TTL_S = 600


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


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30)


# ---------------------------------------------------------------- worker liveness

def mark_alive(connection: redis.Redis, worker_name: str, ttl_s: float = ALIVE_TTL_S) -> None:
    now = time.time()
    with connection.pipeline() as pipe:
        pipe.zadd(WORKERS_KEY, {worker_name: now + ttl_s})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - 3600)  # forget workers dead for an hour
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
        registry = StartedJobRegistry(name, connection=connection)
        out_of_retries = []
        for entry in connection.zrange(registry.key, 0, -1):
            job_id = registry.parse_job_id(entry)
            try:
                job = Job.fetch(job_id, connection=connection)
            except NoSuchJobError:
                continue
            if not job.worker_name or is_alive(connection, job.worker_name):
                continue
            abandoned.append(job_id)
            if (job.retries_left or 0) > 0:
                connection.zrem(registry.key, entry)
                job.retries_left -= 1
                job.save()
                Queue(job.origin, connection=connection).enqueue_job(job, at_front=True)
            else:
                out_of_retries.append(entry)
        if out_of_retries:
            connection.zadd(registry.key, {entry: 0 for entry in out_of_retries}, xx=True)
            registry.cleanup(timestamp=1)
    if abandoned:
        log.warning("re-queued or failed %d job(s) of dead workers: %s", len(abandoned), ", ".join(abandoned))
    return abandoned


# ---------------------------------------------------------------- job functions (run in a worker)

def predict_job(body: dict) -> list[dict]:
    """An LS /predict body (already validated by the web process) → one prediction per task."""
    from backend.tasks import parse_predict_request
    from backend.worker import resident_pipeline

    pipeline = resident_pipeline()
    return pipeline.predict(parse_predict_request(body, pipeline.limits))


def prelabel_chunk_job(run_id: str, spec: dict, tasks: list[dict]) -> None:
    """Label one chunk of a bulk run and write the predictions back to LS."""
    from rq import get_current_job

    from backend.lsclient import LabelStudioApi
    from backend.prelabel import PrelabelSpec, process_chunk
    from backend.runstore import RedisRunStore
    from backend.worker import resident_pipeline

    pipeline = resident_pipeline()
    settings = pipeline.settings
    with LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key) as api:
        process_chunk(pipeline, api, RedisRunStore(get_current_job().connection), run_id,
                      PrelabelSpec.from_dict(spec), tasks)


# ---------------------------------------------------------------- enqueueing (web process, CLI)

def enqueue_prelabel_chunk(connection: redis.Redis, run_id: str, spec, tasks: list[dict]) -> str:
    job = Queue(PRELABEL, connection=connection).enqueue(
        prelabel_chunk_job, run_id, spec.to_dict(), tasks, job_timeout=PRELABEL_JOB_TIMEOUT_S,
        retry=PRELABEL_RETRY, result_ttl=RESULT_TTL_S, failure_ttl=24 * 3600, meta={"run_id": run_id},
        description=f"prelabel run {run_id}: {len(tasks)} tasks")
    from backend.runstore import ACTIVE_TTL_S, jobs_key

    with connection.pipeline(transaction=False) as pipe:
        pipe.sadd(jobs_key(run_id), job.id)
        pipe.expire(jobs_key(run_id), ACTIVE_TTL_S)  # the supervisor's touch refreshes it, its end shortens it
        pipe.execute()
    return job.id


def _run_jobs(connection: redis.Redis, run_id: str) -> list[Job]:
    from backend.runstore import jobs_key

    ids = [i.decode() if isinstance(i, bytes) else i for i in connection.smembers(jobs_key(run_id))]
    return [job for job in Job.fetch_many(ids, connection=connection) if job is not None]


def run_jobs_in_flight(connection: redis.Redis, run_id: str) -> int:
    """Jobs of this run that are queued, waiting for a retry, or running on a live worker."""
    waiting = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
    count = 0
    for job in _run_jobs(connection, run_id):
        status = job.get_status(refresh=False)
        if status in waiting or (status == JobStatus.STARTED and job.worker_name
                                 and is_alive(connection, job.worker_name)):
            count += 1
    return count


def cancel_run_jobs(connection: redis.Redis, run_id: str) -> int:
    """Cancel this run's jobs that have not started; running chunks see the run's cancelled flag."""
    cancelled = 0
    for job in _run_jobs(connection, run_id):
        if job.get_status(refresh=False) in {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}:
            job.cancel()
            cancelled += 1
    return cancelled


class QueueClient:
    """The web process's view of the queues: interactive predictions and health."""

    def __init__(self, redis_url: str, predict_timeout_s: float, chunk_size: int):
        self.connection = connect(redis_url)
        self.health_connection = connect(redis_url, timeout_s=0.5)  # /health must answer within 1 s
        self.predict_timeout_s = predict_timeout_s
        self.chunk_size = chunk_size

    def predict(self, body: dict) -> list[dict]:
        """Enqueue the tasks in chunks on ``interactive`` and wait for all of them, in task order."""
        tasks = body["tasks"]
        deadline = time.monotonic() + self.predict_timeout_s
        try:
            queue = Queue(INTERACTIVE, connection=self.connection)
            jobs = [queue.enqueue(predict_job, {**body, "tasks": tasks[i:i + self.chunk_size]},
                                  job_timeout=int(self.predict_timeout_s) + 30, retry=Retry(max=1),
                                  result_ttl=60, failure_ttl=3600, description=f"predict {len(tasks)} tasks")
                    for i in range(0, len(tasks), self.chunk_size)]
            results: list[dict] = []
            for job in jobs:
                results.extend(self._wait(job, deadline))
            return results
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis is unreachable ({type(exc).__name__}): check REDIS_URL") from None
        except QueueTimeout:
            for job in jobs:
                if job.get_status() == JobStatus.QUEUED:
                    job.cancel()
            raise

    def _wait(self, job: Job, deadline: float) -> list[Any]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueTimeout(f"no worker finished the job within PREDICT_TIMEOUT={self.predict_timeout_s:g} s: "
                                   "check that `python -m backend worker` is running and not overloaded")
            result = job.latest_result(timeout=max(1, min(2, int(remaining))))
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
                    pipe.llen(Queue(name, connection=self.health_connection).key)
                pipe.zcount(WORKERS_KEY, time.time(), "+inf")
                *depths, workers = pipe.execute()
        except redis.RedisError as exc:
            return {"status": "DEGRADED", "redis": f"unreachable ({type(exc).__name__})"}
        return {"status": "UP" if workers else "DEGRADED", "redis": "ok", "workers": int(workers),
                "queues": dict(zip(QUEUES, (int(d) for d in depths)))}


__all__ = ["INTERACTIVE", "PRELABEL", "QueueClient", "QueueError", "QueueTimeout", "QueueUnavailable", "JobFailed",
           "cancel_run_jobs", "connect", "enqueue_prelabel_chunk", "live_workers",
           "mark_alive", "mark_gone", "predict_job", "prelabel_chunk_job", "requeue_abandoned",
           "run_jobs_in_flight"]


# ---------------------------------------------------------------- model versions the live workers serve

WORKER_VERSIONS_KEY = "gsam:worker-versions"
#: How long the worker registry outlives its last refresh (a worker refreshes it every few seconds).
REGISTRY_TTL_S = 3600


def register_worker_version(connection: redis.Redis, worker_name: str, model_version: str) -> None:
    """Record the model version ``worker_name`` serves (a worker's housekeeping, every few seconds).

    ``gsam:worker-versions`` is a hash worker name -> version; which workers are alive is the
    ``gsam:workers`` sorted set. Both keys expire an hour after the last worker refreshed them, and
    entries of workers that left the liveness set are dropped here.
    """
    with connection.pipeline(transaction=False) as pipe:
        pipe.hset(WORKER_VERSIONS_KEY, worker_name, model_version)
        pipe.expire(WORKER_VERSIONS_KEY, REGISTRY_TTL_S)
        pipe.expire(WORKERS_KEY, REGISTRY_TTL_S)
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


def run_tasks_in_flight(connection: redis.Redis, run_id: str) -> set[int]:
    """Ids of the tasks in this run's jobs that are queued, waiting for a retry, or running on a live
    worker: what a supervisor that adopts the run must not enqueue again."""
    waiting = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
    ids: set[int] = set()
    for job in _run_jobs(connection, run_id):
        status = job.get_status(refresh=False)
        if status in waiting or (status == JobStatus.STARTED and job.worker_name
                                 and is_alive(connection, job.worker_name)):
            ids.update(int(task["id"]) for task in job.args[2])
    return ids
