"""The RQ transport: the two queues, the JSON serializer, and the job class that runs only allowed functions.

Two kinds of queue, served in this order by every worker: ``interactive`` (an annotator or LS is
waiting on the HTTP call) and ``prelabel`` (bulk runs). Each engine has its own queues
(``interactive.sam3``, ``prelabel.grounded-sam``: :func:`engine_queue`), so a job is only taken by
a worker that serves its project's engine, and each worker has one more, its own
(``interactive.<engine>.<worker name>``: :func:`worker_queue`), where the web process sends the
clicks of the images that worker owns (:mod:`backend.queue.affinity`). A worker serves its own
queue first, then its engine's ``interactive``, then its engine's ``prelabel``.

Trust boundary: anyone who can write to Redis can push jobs. So nothing here is pickled (jobs,
arguments, results and meta cross Redis as JSON, :data:`SERIALIZER`), and a job runs only a function
its job class allows, never callbacks or webhooks (:class:`GsamJob`). The allow-list is given by the
worker process at start (:meth:`GsamJob.allowing`); the plain :class:`GsamJob` the web process uses
allows nothing (it never runs jobs). Every queue, job and registry object is built by :func:`queue` /
:func:`fetch_job` / :func:`fetch_jobs` so no code path falls back to RQ's pickle default.

Imports rq and redis, nothing of the backend.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterable

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

INTERACTIVE, PRELABEL = "interactive", "prelabel"
#: Every kind of queue, in the order a worker serves them.
QUEUES = (INTERACTIVE, PRELABEL)
#: Engine names are :class:`backend.settings.EngineKind` values; they name queues, so no '.' in them.
_ENGINE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_WORKER_NAME = re.compile(r"gsam-[0-9a-f]{12}")
PRELABEL_JOB_TIMEOUT_S = 900
PRELABEL_RETRY = Retry(max=3, interval=[5, 20, 60])
RESULT_TTL_S = 600
#: The one serializer of every queue, job, result and meta: JSON, so reading Redis never runs code.
SERIALIZER = JSONSerializer


class UnsafeJobError(RuntimeError):
    """A job in Redis names a function that is not one of this backend's job functions."""


def function_path(function: Callable) -> str:
    """The import path RQ stores in a job's ``func_name`` when ``function`` is enqueued."""
    return f"{function.__module__}.{function.__qualname__}"


class GsamJob(Job):
    """An RQ job that can run only the functions named in :attr:`allowed` (none on this class).

    RQ resolves ``func_name`` with an import (``os.system`` would do) and would also import and call
    success/failure/stopped callbacks and send webhooks named in the job hash. We enqueue none of
    those, so a job that carries them was not written by us: its function is refused (the job
    fails with the reason), and callbacks and webhooks are never run.
    """

    #: Import paths of the functions jobs of this class may run; imported only when a job names one.
    allowed: frozenset[str] = frozenset()

    @classmethod
    def allowing(cls, paths: Iterable[str]) -> type[GsamJob]:
        """A job class that runs the functions at ``paths`` (``module.function``, see :func:`function_path`)."""
        return type("AllowListedJob", (cls,), {"allowed": frozenset(paths), "__module__": __name__})

    @property
    def func(self):
        name = self.func_name  # DeserializationError for a non-JSON (e.g. pickled) payload: the job fails
        if not isinstance(name, str) or name not in self.allowed or self.instance is not None:
            raise UnsafeJobError(f"refused job {self.id}: {name!r} is not a job function of this backend "
                                 f"(allowed: {', '.join(sorted(self.allowed)) or 'none'})")
        module, _, attribute = name.rpartition(".")
        return getattr(importlib.import_module(module), attribute)  # name is one of ours: importing it is safe

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


def engine_queue(kind: str, engine: str) -> str:
    """The name of ``engine``'s shared queue of ``kind`` (``interactive`` or ``prelabel``)."""
    if kind not in QUEUES or not _ENGINE_NAME.fullmatch(engine):
        raise ValueError(f"no queue {kind!r} for engine {engine!r}: kinds are {', '.join(QUEUES)}")
    return f"{kind}.{engine}"


def worker_queue(engine: str, worker_name: str) -> str:
    """The name of one worker's own interactive queue (the clicks of the images it owns)."""
    if not _WORKER_NAME.fullmatch(worker_name):
        raise ValueError(f"not a worker name: {worker_name!r}")
    return f"{engine_queue(INTERACTIVE, engine)}.{worker_name}"


def parse_worker_queue(name: str) -> tuple[str, str] | None:
    """``(engine, worker name)`` of a :func:`worker_queue` name; None for any other name."""
    kind, _, rest = name.partition(".")
    engine, _, worker = rest.partition(".")
    if kind != INTERACTIVE or not _ENGINE_NAME.fullmatch(engine) or not _WORKER_NAME.fullmatch(worker):
        return None
    return engine, worker


def new_worker_name() -> str:
    """A fresh worker name (what :func:`worker_queue` accepts)."""
    import uuid

    return f"gsam-{uuid.uuid4().hex[:12]}"


def queue(name: str, connection: redis.Redis, job_class: type[GsamJob] = GsamJob) -> Queue:
    """An RQ queue with this module's serializer and a :class:`GsamJob` class (never RQ's pickle default)."""
    return Queue(name, connection=connection, serializer=SERIALIZER, job_class=job_class)


def fetch_job(job_id: str, connection: redis.Redis) -> GsamJob:
    return GsamJob.fetch(job_id, connection=connection, serializer=SERIALIZER)


def fetch_jobs(job_ids: list[str], connection: redis.Redis) -> list[GsamJob | None]:
    return GsamJob.fetch_many(job_ids, connection=connection, serializer=SERIALIZER)


#: A job no worker has started yet: deleting it means it never runs.
NOT_STARTED = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED})


def drop_unstarted(jobs: Iterable[Job], refresh: bool = True) -> int:
    """Delete the jobs no worker has started; returns how many. Deleted, not cancelled: RQ keeps a
    cancelled job's hash (its whole payload) and its canceled-registry entry with no expiry.
    A job already gone (expired, deleted by a racing caller) is skipped."""
    dropped = 0
    for job in jobs:
        try:
            if job.get_status(refresh=refresh) in NOT_STARTED:
                job.delete()
                dropped += 1
        except (InvalidJobOperation, NoSuchJobError):
            continue
    return dropped


__all__ = ["engine_queue", "new_worker_name", "parse_worker_queue", "worker_queue", "GsamJob", "INTERACTIVE", "PRELABEL", "PRELABEL_JOB_TIMEOUT_S", "PRELABEL_RETRY", "QUEUES",
           "NOT_STARTED", "RESULT_TTL_S", "SERIALIZER", "UnsafeJobError", "drop_unstarted", "fetch_job", "fetch_jobs",
           "function_path", "queue"]
