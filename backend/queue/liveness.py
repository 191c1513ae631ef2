"""Which workers are alive, the model versions they serve, and re-queueing the jobs of dead ones.

RQ notices a dead non-forking worker only after its job's timeout + 60 s. Workers here also keep an
entry in the ``gsam:workers`` sorted set (score = when it expires, refreshed every few seconds by
the worker's housekeeping). Each round, one worker (the holder of ``gsam:reaper-lock``) runs
:func:`requeue_abandoned`: a started job whose worker has no live entry is put back at the front of
its queue at once while it has retries left (each re-queue spends one), and failed through RQ's own
abandoned-job handling once it has none.

A worker whose models cannot load exits; before it does, :func:`record_load_error` leaves the
reason in ``gsam:worker-errors`` for :data:`LOAD_ERROR_TTL_S`, where queue-mode ``/health`` reads it.

Keys (names in :mod:`backend.queue.keys`): ``gsam:workers`` and ``gsam:worker-info`` expire a
minute after the last worker refreshed them; ``gsam:reaper-lock`` is set with PX;
``gsam:worker-errors`` expires :data:`LOAD_ERROR_TTL_S` after the last error was recorded.
Imports the transport and the key names; nothing else of the backend.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import redis
from rq.exceptions import NoSuchJobError
from rq.registry import StartedJobRegistry

from backend.queue import keys
from backend.queue.transport import (INTERACTIVE, QUEUES, SERIALIZER, GsamJob, engine_queue, fetch_job,
                                    parse_worker_queue, queue)

#: The longest model version a worker may register (as ``extra_params.model_version`` allows).
MAX_VERSION_CHARS = 200

log = logging.getLogger(__name__)

ALIVE_TTL_S = 15
#: How long ``gsam:workers`` outlives the last heartbeat of any worker (all its entries are stale by then).
WORKERS_KEY_TTL_S = 4 * ALIVE_TTL_S
#: The version registry lives as long as the liveness set it is read with (refreshed every few seconds).
REGISTRY_TTL_S = WORKERS_KEY_TTL_S
#: How long /health shows a worker's model-load error: longer than the restart back-off of process
#: managers (Kubernetes' CrashLoopBackOff caps at 5 min), so a worker restarted in a loop keeps it shown.
LOAD_ERROR_TTL_S = 600
MAX_LOAD_ERRORS = 10  # distinct reasons kept, the latest
MAX_LOAD_ERROR_CHARS = 500


def mark_alive(connection: redis.Redis, worker_name: str, ttl_s: float = ALIVE_TTL_S) -> None:
    now = time.time()
    with connection.pipeline() as pipe:
        pipe.zadd(keys.WORKERS, {worker_name: now + ttl_s})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - 3600)  # forget workers dead for an hour
        pipe.expire(keys.WORKERS, WORKERS_KEY_TTL_S)  # gone with the last worker: a missing entry reads as dead
        pipe.execute()


def mark_gone(connection: redis.Redis, worker_name: str) -> None:
    connection.zrem(keys.WORKERS, worker_name)


def live_workers(connection: redis.Redis) -> int:
    return int(connection.zcount(keys.WORKERS, time.time(), "+inf"))


def is_alive(connection: redis.Redis, worker_name: str) -> bool:
    expires = connection.zscore(keys.WORKERS, worker_name)
    return expires is not None and expires > time.time()


def claim_reaper_round(connection: redis.Redis, worker_name: str, hold_s: float) -> bool:
    """True when ``worker_name`` runs this housekeeping round: one reaper at a time across all
    workers; the lock expires after ``hold_s`` (before the next round)."""
    return bool(connection.set(keys.REAPER_LOCK, worker_name, nx=True, px=int(hold_s * 1000)))


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker declares it serves: its ``engine`` (``ENGINE``), the ``model_version`` that
    names its models, and ``models`` (the settings naming its checkpoints, e.g. ``{"SAM_MODEL": ...}``)."""

    engine: str
    model_version: str
    models: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"engine": self.engine, "model_version": self.model_version, "models": self.models})

    @classmethod
    def from_json(cls, raw) -> WorkerInfo | None:
        """None for an entry that is not one (it crossed Redis: checked, never trusted)."""
        try:
            data = json.loads(raw)
        except (TypeError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        engine, version, models = data.get("engine"), data.get("model_version"), data.get("models") or {}
        if not isinstance(engine, str) or not isinstance(version, str) or not isinstance(models, dict):
            return None
        return cls(engine[:64], version[:MAX_VERSION_CHARS],
                   {str(k)[:64]: str(v)[:500] for k, v in list(models.items())[:8]})


def register_worker(connection: redis.Redis, worker_name: str, info: WorkerInfo) -> None:
    """Record what ``worker_name`` serves (a worker's housekeeping, every few seconds).

    ``gsam:worker-info`` is a hash worker name -> :meth:`WorkerInfo.to_json`; which workers are
    alive is the ``gsam:workers`` sorted set. Both keys expire a minute after the last worker
    refreshed them, and entries of workers that left the liveness set are dropped here.
    """
    with connection.pipeline(transaction=False) as pipe:
        pipe.hset(keys.WORKER_INFO, worker_name, info.to_json())
        pipe.expire(keys.WORKER_INFO, REGISTRY_TTL_S)  # gsam:workers' own expiry is mark_alive's
        pipe.hkeys(keys.WORKER_INFO)
        names = pipe.execute()[-1]
    if names:
        scores = connection.zmscore(keys.WORKERS, names)
        gone = [name for name, score in zip(names, scores) if score is None]
        if gone:
            connection.hdel(keys.WORKER_INFO, *gone)


def live_worker_info(connection: redis.Redis) -> dict[str, WorkerInfo]:
    """Worker name -> what it serves, for the live workers that registered (in one round trip)."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(keys.WORKERS, time.time(), "+inf")
        pipe.hgetall(keys.WORKER_INFO)
        live, registered = pipe.execute()
    infos = {_text(name): WorkerInfo.from_json(raw) for name, raw in registered.items()}
    return {name: info for name, info in ((_text(n), infos.get(_text(n))) for n in live) if info is not None}


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def live_model_versions(connection: redis.Redis, engine: str | None = None) -> dict[str, list[str]]:
    """Model version -> names of the live workers that serve it (of ``engine`` only, when given;
    workers that registered nothing are left out)."""
    versions: dict[str, list[str]] = {}
    for name, info in sorted(live_worker_info(connection).items()):
        if engine is None or info.engine == engine:
            versions.setdefault(info.model_version, []).append(name)
    return versions


def live_engines(connection: redis.Redis) -> dict[str, dict[str, list[str]]]:
    """Engine -> model version -> names of the live workers serving it."""
    engines: dict[str, dict[str, list[str]]] = {}
    for name, info in sorted(live_worker_info(connection).items()):
        engines.setdefault(info.engine, {}).setdefault(info.model_version, []).append(name)
    return engines


def record_load_error(connection: redis.Redis, reason: str, ttl_s: float = LOAD_ERROR_TTL_S) -> None:
    """Record why a worker cannot load its models (``ModelLoadError.reason``) for ``ttl_s`` seconds.

    ``gsam:worker-errors`` is a sorted set reason -> when it expires: workers failing for the same
    reason share one entry, expired entries are dropped here, at most :data:`MAX_LOAD_ERRORS` are
    kept, and the key itself expires with its latest entry."""
    now = time.time()
    with connection.pipeline() as pipe:
        pipe.zadd(keys.WORKER_ERRORS, {reason[:MAX_LOAD_ERROR_CHARS]: now + ttl_s})
        pipe.zremrangebyscore(keys.WORKER_ERRORS, "-inf", now)
        pipe.zremrangebyrank(keys.WORKER_ERRORS, 0, -(MAX_LOAD_ERRORS + 1))
        pipe.expire(keys.WORKER_ERRORS, max(1, math.ceil(ttl_s)))
        pipe.execute()


def load_errors(connection: redis.Redis) -> list[str]:
    """The model-load errors of workers recorded less than :data:`LOAD_ERROR_TTL_S` ago, latest first."""
    return decode_load_errors(connection.zrevrangebyscore(keys.WORKER_ERRORS, "+inf", time.time()))


def decode_load_errors(entries) -> list[str]:
    """``ZREVRANGEBYSCORE gsam:worker-errors +inf NOW``'s answer as text (also read in a pipeline)."""
    return [e.decode(errors="replace") if isinstance(e, bytes) else str(e) for e in entries]


def shared_queues() -> list[str]:
    """Every engine's shared queues (``interactive.<engine>``, ``prelabel.<engine>``), engine by engine."""
    from backend.settings import EngineKind

    return [engine_queue(kind, engine.value) for engine in EngineKind for kind in QUEUES]


def known_queues(connection: redis.Redis) -> list[str]:
    """The names of every queue of this backend: each engine's shared queues, and the per-worker
    queues RQ has registered (``rq:queues``)."""
    from rq import Queue

    names = shared_queues()
    for registered in Queue.all(connection=connection, serializer=SERIALIZER):
        if parse_worker_queue(registered.name) is not None:
            names.append(registered.name)
    return names


def requeue_abandoned(connection: redis.Redis) -> list[str]:
    """Re-queue (at the front) the started jobs of dead workers, and move the jobs waiting in a dead
    worker's own queue to its engine's shared queue. Returns the ids of the started ones.

    No backoff: a worker's death is not the job's fault, and RQ's scheduled retries would wait for
    a scheduler whose lock the dead worker may still hold. Each re-queue spends one retry, so a job
    that keeps killing workers ends; one without retries left goes through RQ's own abandoned-job
    handling (recorded as failed). A job re-queued from a worker's own queue goes to the shared one
    (its owner is gone; any worker of the engine may take it).
    """
    abandoned = []
    for name in known_queues(connection):
        owned = parse_worker_queue(name)
        target = engine_queue(INTERACTIVE, owned[0]) if owned else name
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
                job.origin = target
                job.save()
                queue(target, connection).enqueue_job(job, at_front=True)
            else:
                out_of_retries.append(entry)
        if out_of_retries:
            connection.zadd(registry.key, {entry: 0 for entry in out_of_retries}, xx=True)
            registry.cleanup(timestamp=1)
        if owned and not is_alive(connection, owned[1]):
            _hand_over(connection, name, target)
    if abandoned:
        log.warning("re-queued or failed %d job(s) of dead workers: %s", len(abandoned), ", ".join(abandoned))
    return abandoned


def _hand_over(connection: redis.Redis, dead: str, target: str) -> None:
    """Move the jobs waiting in a dead worker's queue ``dead`` to ``target``, in order, and forget
    the queue once it is empty and its started registry too (RQ lists queues in ``rq:queues``)."""
    source = queue(dead, connection)
    moved = 0
    for job_id in source.get_job_ids():
        try:
            job = fetch_job(job_id, connection)
        except NoSuchJobError:
            source.remove(job_id)
            continue
        source.remove(job_id)
        job.origin = target
        job.save()
        queue(target, connection).enqueue_job(job)
        moved += 1
    if moved:
        log.warning("moved %d waiting job(s) of a dead worker's queue to %s", moved, target)
    started = StartedJobRegistry(dead, connection=connection, job_class=GsamJob, serializer=SERIALIZER)
    if source.count == 0 and started.count == 0:
        source.delete(delete_jobs=False)


__all__ = ["ALIVE_TTL_S", "LOAD_ERROR_TTL_S", "REGISTRY_TTL_S", "WORKERS_KEY_TTL_S", "claim_reaper_round",
           "decode_load_errors", "is_alive", "live_model_versions", "live_workers", "load_errors", "mark_alive",
           "mark_gone", "record_load_error", "register_worker", "requeue_abandoned", "WorkerInfo", "known_queues",
           "live_engines", "live_worker_info", "shared_queues"]
