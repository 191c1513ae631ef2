"""A bulk run's chunks as RQ jobs on its engine's ``prelabel`` queue: the job function workers run, and the
supervisor's side (enqueue, count and cancel a run's jobs) as :class:`RqChunkQueue`, the default
:class:`~backend.bulk.supervisor.ChunkQueue`.

The job's arguments cross Redis as JSON: ``prelabel_chunk_job(run_id, spec, tasks)`` with
``spec`` = :meth:`PrelabelSpec.to_dict` and ``tasks`` = ``[BulkTask.to_json(), ...]``; this is the
only place bulk tasks are dicts. A run's job ids are kept in ``gsam:run:<id>:jobs``
(:func:`backend.queue.keys.jobs_key`), which expires with the run's record.

Imports RQ and the queue transport (queue mode only: nothing in embedded mode imports this
module); reaches the worker's resident pipeline through :func:`backend.queue.resident.resident_pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from rq import get_current_job
from rq.job import Job, JobStatus

from backend.bulk.prelabel import process_chunk
from backend.bulk.request import MAX_CHUNK
from backend.bulk.redisstore import ACTIVE_TTL_S, RedisRunStore
from backend.bulk.spec import BulkTask, PrelabelSpec
from backend.ls.client import LabelStudioApi
from backend.queue import keys
from backend.queue.liveness import is_alive, live_engines, live_model_versions, live_workers
from backend.queue.resident import resident_pipeline
from backend.queue.transport import (NOT_STARTED, PRELABEL, PRELABEL_JOB_TIMEOUT_S, PRELABEL_RETRY, RESULT_TTL_S,
                                    drop_unstarted, engine_queue, fetch_jobs, queue)

FAILURE_TTL_S = 24 * 3600


# ---------------------------------------------------------------- the job (runs in a worker)

def prelabel_chunk_job(run_id: str, spec: dict, tasks: list[dict]) -> None:
    """Label one chunk of a bulk run and write the predictions back to LS."""
    # The arguments crossed Redis: check their shape before any key is named or any task is listed.
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_CHUNK or not isinstance(spec, dict):
        raise ValueError(f"a prelabel chunk is a spec object and 1 to {MAX_CHUNK} tasks")
    if not isinstance(run_id, str) or not keys.RUN_ID.fullmatch(run_id):
        raise ValueError(f"not a run id (16 lowercase hex characters): {run_id!r:.40}")
    run_spec, run_tasks = PrelabelSpec.from_dict(spec), [BulkTask.from_json(t) for t in tasks]
    pipeline = resident_pipeline()
    settings = pipeline.settings
    with LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key) as api:
        process_chunk(pipeline, api, RedisRunStore(get_current_job().connection), run_id, run_spec, run_tasks)


# ---------------------------------------------------------------- the supervisor's side

def enqueue_prelabel_chunk(connection: redis.Redis, run_id: str, spec: PrelabelSpec,
                           tasks: Sequence[BulkTask]) -> str:
    """Enqueue one chunk on its engine's ``prelabel`` queue and record its job id with the run;
    returns the job id."""
    job = queue(engine_queue(PRELABEL, spec.engine), connection).enqueue(
        prelabel_chunk_job, run_id, spec.to_dict(), [t.to_json() for t in tasks],
        # ttl: a queued chunk no worker takes expires with its run's record, not never
        job_timeout=PRELABEL_JOB_TIMEOUT_S, retry=PRELABEL_RETRY, ttl=ACTIVE_TTL_S, result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S, meta={"run_id": run_id}, description=f"prelabel run {run_id}: {len(tasks)} tasks")
    with connection.pipeline(transaction=False) as pipe:
        pipe.sadd(keys.jobs_key(run_id), job.id)
        pipe.expire(keys.jobs_key(run_id), ACTIVE_TTL_S)  # the supervisor's touch refreshes it, its end shortens it
        pipe.execute()
    return job.id


def _run_jobs(connection: redis.Redis, run_id: str) -> list[Job]:
    ids = [i.decode() if isinstance(i, bytes) else i for i in connection.smembers(keys.jobs_key(run_id))]
    return [job for job in fetch_jobs(ids, connection) if job is not None]


def _live_jobs(connection: redis.Redis, run_id: str) -> list[Job]:
    """The run's jobs that are queued, waiting for a retry, or running on a live worker."""
    live = []
    for job in _run_jobs(connection, run_id):
        status = job.get_status(refresh=False)
        if status in NOT_STARTED or (status == JobStatus.STARTED and job.worker_name
                                  and is_alive(connection, job.worker_name)):
            live.append(job)
    return live


def run_jobs_in_flight(connection: redis.Redis, run_id: str) -> int:
    """Jobs of this run that are queued, waiting for a retry, or running on a live worker."""
    return len(_live_jobs(connection, run_id))


def run_tasks_in_flight(connection: redis.Redis, run_id: str) -> set[int]:
    """Ids of the tasks in this run's jobs in flight: what a supervisor that adopts the run must
    not enqueue again."""
    return {BulkTask.from_json(task).id for job in _live_jobs(connection, run_id) for task in job.args[2]}


def cancel_run_jobs(connection: redis.Redis, run_id: str) -> int:
    """Delete this run's jobs that have not started; running chunks see the run's cancelled flag."""
    return drop_unstarted(_run_jobs(connection, run_id), refresh=False)


class RqChunkQueue:
    """:class:`~backend.bulk.supervisor.ChunkQueue` on RQ: the ``prelabel`` queue and the workers'
    liveness entries of one Redis."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection

    def enqueue(self, run_id: str, spec: PrelabelSpec, tasks: Sequence[BulkTask]) -> str:
        return enqueue_prelabel_chunk(self.connection, run_id, spec, tasks)

    def in_flight(self, run_id: str) -> int:
        return run_jobs_in_flight(self.connection, run_id)

    def tasks_in_flight(self, run_id: str) -> set[int]:
        return run_tasks_in_flight(self.connection, run_id)

    def cancel(self, run_id: str) -> int:
        return cancel_run_jobs(self.connection, run_id)

    def live_workers(self) -> int:
        return live_workers(self.connection)

    def live_model_versions(self, engine: str | None = None) -> dict[str, list[str]]:
        return live_model_versions(self.connection, engine)

    def live_engines(self) -> dict[str, dict[str, list[str]]]:
        return live_engines(self.connection)


__all__ = ["RqChunkQueue", "cancel_run_jobs", "enqueue_prelabel_chunk", "prelabel_chunk_job", "run_jobs_in_flight",
           "run_tasks_in_flight"]
