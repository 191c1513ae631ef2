"""``python -m backend worker``: an RQ worker that loads the models once and keeps them resident.

RQ's default ``Worker`` forks a child per job, which would reload the models for every job and
breaks CUDA; this one subclasses ``SimpleWorker`` (jobs run in the worker's own process). A
daemon thread keeps the worker's liveness entry fresh and re-queues jobs of dead workers
(see :mod:`backend.queue.jobs`). If Redis goes away the worker reconnects with backoff instead of exiting.

Jobs are read as JSON and only :data:`backend.queue.jobs.JOB_FUNCTIONS` run (:class:`backend.queue.jobs.GsamJob`).

CPU threads: several workers on one host each get torch's default thread pool (one thread per core)
and OpenMP threads that spin while waiting, so they fight for the cores (a 6 ms job took 3 s with two
workers on two cores). A worker therefore uses ``threads`` (default 1) torch/OpenMP threads and
OpenMP's passive wait policy, both set before torch is first imported (the OpenMP runtime reads its
environment once, at load).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid

import redis
from rq import SimpleWorker

from backend.queue import jobs
from backend.pipeline.predict import Pipeline
from backend.settings import Settings
from backend.bulk.adopt import adopt_orphaned_runs
from backend.bulk.chunkjob import prelabel_chunk_job

# Bulk chunks run in workers too; queue/jobs.py cannot name the bulk job function (queue never imports bulk).
jobs.JOB_FUNCTIONS[f"{prelabel_chunk_job.__module__}.{prelabel_chunk_job.__qualname__}"] = prelabel_chunk_job

log = logging.getLogger(__name__)

_resident: Pipeline | None = None  # set once per worker process, before any job runs
HOUSEKEEPING_EVERY_S = 5.0
# RQ's default (600 s) is how long a surviving worker waits before taking over the scheduler lock of a
# dead one; retries with backoff are scheduled jobs, so they would stall that long.
MAINTENANCE_EVERY_S = 30


def resident_pipeline() -> Pipeline:
    """The worker process's pipeline (models loaded at worker start)."""
    if _resident is None:
        raise RuntimeError("no resident pipeline: job functions run inside `python -m backend worker`")
    return _resident


class GsamWorker(SimpleWorker):
    """SimpleWorker plus a liveness/reaper thread for the lifetime of ``work()``."""

    stop_signalled = False

    def request_stop(self, signum, frame):
        # RQ stops an idle worker by raising from this handler without keeping a flag; with Redis
        # down its teardown then fails too, and run_worker must still know not to reconnect.
        self.stop_signalled = True
        super().request_stop(signum, frame)

    def work(self, *args, **kwargs):
        stop = threading.Event()
        thread = threading.Thread(target=self._housekeeping, args=(stop,), name="gsam-housekeeping", daemon=True)
        thread.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            stop.set()
            thread.join(timeout=5)
            try:
                jobs.mark_gone(self.connection, self.name)
            except redis.RedisError:
                pass

    def _housekeeping(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                jobs.mark_alive(self.connection, self.name)
                if _resident is not None:  # bulk runs take their model version from the live workers
                    jobs.register_worker_version(self.connection, self.name, _resident.model_version)
                # One reaper at a time across all workers; the lock expires before the next round.
                if self.connection.set("gsam:reaper-lock", self.name, nx=True, px=int(HOUSEKEEPING_EVERY_S * 900)):
                    jobs.requeue_abandoned(self.connection)
                    if _resident is not None:  # bulk runs whose supervisor died are supervised from here
                        adopt_orphaned_runs(_resident.settings, self.connection)
            except redis.RedisError as exc:
                log.warning("housekeeping: Redis unreachable (%s); retrying", type(exc).__name__)
            stop.wait(HOUSEKEEPING_EVERY_S)


def limit_cpu_threads(threads: int) -> None:
    """Give this process ``threads`` torch/OpenMP/BLAS threads and a passive OpenMP wait policy.

    The environment part only works before torch is imported (checked: ``backend.queue.worker`` and
    ``backend.pipeline.predict`` do not import it); values already in the environment win, so an operator
    can still choose e.g. ``OMP_WAIT_POLICY=ACTIVE``.
    """
    if threads < 1:
        raise SystemExit(f"--threads / WORKER_THREADS must be at least 1, not {threads}")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)


def run_worker(settings: Settings, queues: list[str], batch_size: int | None = None, burst: bool = False,
               metrics_port: int | None = None, metrics_host: str = "127.0.0.1", threads: int = 1) -> None:
    """Load the models, then serve ``queues`` (in priority order) until stopped.

    With ``metrics_port`` the worker serves its own Prometheus metrics (the embedding cache, stage
    times, tasks) on ``metrics_host`` (loopback unless told otherwise): in queue mode those live in
    the worker, not in the web process. ``threads``: torch/OpenMP threads (see the module doc).
    """
    global _resident
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is not set: a worker serves the queues of a Redis server")
    unknown = [q for q in queues if q not in jobs.QUEUES]
    if unknown:
        raise SystemExit(f"unknown queue(s) {unknown}: use {', '.join(jobs.QUEUES)}")
    limit_cpu_threads(threads)
    if batch_size:
        from dataclasses import replace

        settings = replace(settings, batch_size=batch_size)
    _resident = Pipeline(settings)
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host, registry=_resident.metrics.registry)
    _resident.engine()  # load now: the first job should not pay for it
    name = f"gsam-{uuid.uuid4().hex[:12]}"
    backoff = 1.0
    while True:
        connection = jobs.connect(settings.redis_url)
        worker = None
        try:
            worker = GsamWorker([jobs.queue(q, connection) for q in queues], connection=connection,
                                name=name, worker_ttl=60, maintenance_interval=MAINTENANCE_EVERY_S,
                                serializer=jobs.SERIALIZER, job_class=jobs.GsamJob)
            log.info("worker %s serving %s (%d CPU thread(s))", name, ", ".join(queues), threads)
            worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
            return
        except redis.RedisError as exc:
            if worker is not None and (worker.stop_signalled or worker._stop_requested):
                return  # asked to stop (SIGTERM/SIGINT) while Redis was away: stop, do not reconnect
            log.warning("worker %s lost Redis (%s); reconnecting in %.0f s", name, type(exc).__name__, backoff)
            # RQ's signal handlers only set a flag; outside work() a stop signal must end the process.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            name = f"gsam-{uuid.uuid4().hex[:12]}"  # the old registration may linger until it expires
