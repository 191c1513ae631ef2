"""``python -m backend worker``: an RQ worker that loads the models once and keeps them resident.

A composition root like the web app: it may import bulk, queue and pipeline. It builds the pipeline,
installs it for the job functions (:mod:`backend.queue.resident`), and gives the job class the
functions it may run (:data:`JOB_FUNCTIONS`); jobs are read as JSON (:mod:`backend.queue.transport`).

RQ's default ``Worker`` forks a child per job, which would reload the models for every job and
breaks CUDA; this one subclasses ``SimpleWorker`` (jobs run in the worker's own process). A daemon
thread keeps the worker's liveness entry fresh, re-queues jobs of dead workers and adopts bulk runs
whose supervisor died (see :mod:`backend.queue.liveness`). Another encodes the next tasks the web
process asks every worker to pre-warm (:mod:`backend.queue.prewarm`). If Redis goes away the worker
reconnects with :func:`backend.queue.connection.backoff` instead of exiting.

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

import redis
from rq import SimpleWorker

from backend.bulk.adopt import adopt_orphaned_runs
from backend.bulk.chunkjob import prelabel_chunk_job
from backend.errors import ModelLoadError
from backend.pipeline.predict import Pipeline
from backend.pipeline.prewarm import Prewarmer
from backend.modelinfo import model_sources
from backend.queue import affinity, liveness, resident
from backend.queue.connection import backoff, connect
from backend.queue.jobs import predict_job
from backend.queue.prewarm import WarmListener
from backend.queue.transport import (INTERACTIVE, QUEUES, SERIALIZER, GsamJob, engine_queue, function_path,
                                    new_worker_name, queue, worker_queue)
from backend.settings import Settings

log = logging.getLogger(__name__)

#: The only functions a worker runs, by the import path RQ stores in a job's ``func_name``.
JOB_FUNCTIONS = (function_path(predict_job), function_path(prelabel_chunk_job))
HOUSEKEEPING_EVERY_S = 5.0
# RQ's default (600 s) is how long a surviving worker waits before taking over the scheduler lock of a
# dead one; retries with backoff are scheduled jobs, so they would stall that long.
MAINTENANCE_EVERY_S = 30


class GsamWorker(SimpleWorker):
    """SimpleWorker plus a liveness/reaper thread for the lifetime of ``work()``; serves ``pipeline``."""

    stop_signalled = False

    def __init__(self, *args, pipeline: Pipeline, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline
        self.info = worker_info(pipeline.settings, pipeline.model_version)

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
                liveness.mark_gone(self.connection, self.name)
            except redis.RedisError:
                pass

    def _housekeeping(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                liveness.mark_alive(self.connection, self.name)
                # routing (engine queues, click owners) and bulk runs' model version read the live workers
                liveness.register_worker(self.connection, self.name, self.info)
                if liveness.claim_reaper_round(self.connection, self.name, hold_s=0.9 * HOUSEKEEPING_EVERY_S):
                    liveness.requeue_abandoned(self.connection)
                    # bulk runs whose supervisor died are supervised from here
                    adopt_orphaned_runs(self.pipeline.settings, self.connection)
            except redis.RedisError as exc:
                log.warning("housekeeping: Redis unreachable (%s); retrying", type(exc).__name__)
            except Exception:  # the thread must outlive any one round: liveness depends on it
                log.exception("housekeeping: a round failed; retrying")
            stop.wait(HOUSEKEEPING_EVERY_S)


def limit_cpu_threads(threads: int) -> None:
    """Give this process ``threads`` torch/OpenMP/BLAS threads and a passive OpenMP wait policy.

    The environment part only works before torch is imported (checked: ``backend.modes.worker`` and
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


def worker_info(settings: Settings, model_version: str) -> liveness.WorkerInfo:
    """What this worker declares it serves: ENGINE, its model version, the settings naming its checkpoints."""
    return liveness.WorkerInfo(settings.engine.value, model_version, model_sources(settings))


class Identity:
    """This worker's current name (a new one after each reconnect), read by its pre-warming thread."""

    def __init__(self):
        self.name = new_worker_name()

    def renew(self) -> str:
        self.name = new_worker_name()
        return self.name


def owned_tasks(settings: Settings, identity: Identity):
    """``owns(task id)``: whether this worker owns the task among the live workers of its engine
    (:mod:`backend.queue.affinity`; read from Redis per task: workers come and go)."""
    connection = connect(settings.redis_url)
    engine = settings.engine.value

    def owns(task_id: int) -> bool:
        live = liveness.live_worker_info(connection)
        workers = [name for name, info in live.items() if info.engine == engine]
        return affinity.owns(identity.name, affinity.task_key(task_id), workers)

    return owns


def listen_for_warm_requests(settings: Settings, pipeline: Pipeline, identity: Identity) -> WarmListener | None:
    """Encode what the web process broadcasts to pre-warm (:mod:`backend.queue.prewarm`) into this
    worker's embedding cache, between jobs: only requests for this worker's engine, and with click
    affinity only the tasks this worker owns. None without LS credentials (the tasks come from LS)."""
    if not settings.has_label_studio_credentials:
        log.info("pre-warming off in this worker: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to have it "
                 "encode the next tasks' embeddings")
        return None
    engine = settings.engine.value
    prewarmer = Prewarmer(pipeline, owns=owned_tasks(settings, identity) if settings.click_affinity else None)

    def on_request(request) -> None:
        if request.engine in (None, engine):
            prewarmer.submit(request)

    return WarmListener(settings.redis_url, on_request).start()


def served_queues(kinds: list[str], engine: str, worker_name: str) -> list[str]:
    """The queues a worker serves, in priority order: its own (clicks of the images it owns), then
    its engine's queues of ``kinds``."""
    own = [worker_queue(engine, worker_name)] if INTERACTIVE in kinds else []
    return own + [engine_queue(kind, engine) for kind in kinds]


def report_load_error(redis_url: str, reason: str) -> None:
    """Leave why this worker's models cannot load where queue-mode /health reads it
    (:func:`backend.queue.liveness.record_load_error`); best effort: Redis may be unreachable too."""
    try:
        with connect(redis_url, timeout_s=2.0) as connection:
            liveness.record_load_error(connection, reason)
    except redis.RedisError as exc:
        log.warning("could not record the load error in Redis (%s): /health will not show it", type(exc).__name__)


def run_worker(settings: Settings, queues: list[str], batch_size: int | None = None, burst: bool = False,
               metrics_port: int | None = None, metrics_host: str = "127.0.0.1", threads: int = 1) -> None:
    """Load the models, then serve ``queues`` (in priority order) until stopped.

    With ``metrics_port`` the worker serves its own Prometheus metrics (the embedding cache, stage
    times, tasks) on ``metrics_host`` (loopback unless told otherwise): in queue mode those live in
    the worker, not in the web process. ``threads``: torch/OpenMP threads (see the module doc).
    """
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is not set: a worker serves the queues of a Redis server")
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        raise SystemExit(f"unknown queue(s) {unknown}: use {', '.join(QUEUES)}")
    limit_cpu_threads(threads)
    if batch_size:
        from dataclasses import replace

        settings = replace(settings, batch_size=batch_size)
    pipeline = Pipeline(settings)
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host, registry=pipeline.metrics.registry)
    try:
        pipeline.engine()  # load now: the first job should not pay for it
    except ModelLoadError as exc:  # exit non-zero so the process manager shows why, instead of serving
        report_load_error(settings.redis_url, exc.reason)
        raise SystemExit(f"error: the models cannot be loaded: {exc.reason}") from None
    resident.install(pipeline)
    identity = Identity()
    listen_for_warm_requests(settings, pipeline, identity)
    job_class = GsamJob.allowing(JOB_FUNCTIONS)
    name = identity.name
    pauses = backoff(1.0, 30.0)
    while True:
        connection = connect(settings.redis_url)
        worker = None
        try:
            names = served_queues(queues, settings.engine.value, name)
            worker = GsamWorker([queue(q, connection, job_class) for q in names], connection=connection,
                                name=name, worker_ttl=60, maintenance_interval=MAINTENANCE_EVERY_S,
                                serializer=SERIALIZER, job_class=job_class, pipeline=pipeline)
            # registered before it says "serving": the web process routes only to live, registered workers
            liveness.mark_alive(connection, name)
            liveness.register_worker(connection, name, worker.info)
            log.info("worker %s (engine %s, %s) serving %s (%d CPU thread(s))", name, settings.engine.value,
                     pipeline.model_version, ", ".join(names), threads)
            worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
            return
        except redis.RedisError as exc:
            if worker is not None and (worker.stop_signalled or worker._stop_requested):
                return  # asked to stop (SIGTERM/SIGINT) while Redis was away: stop, do not reconnect
            pause = next(pauses)
            log.warning("worker %s lost Redis (%s); reconnecting in %.0f s", name, type(exc).__name__, pause)
            # RQ's signal handlers only set a flag; outside work() a stop signal must end the process.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            time.sleep(pause)
            name = identity.renew()  # the old registration may linger until it expires
