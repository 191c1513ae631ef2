"""Run records of bulk pre-label runs (:mod:`backend.bulk.prelabel`): which tasks a run covers, which
are done and which failed, and the per-task write lock that makes write-back idempotent.

A :class:`RunStore` is either a :class:`RedisRunStore` (queue mode; shared by the supervisor, the
workers and the web process; keys below) or a :class:`MemoryRunStore` (embedded mode, one process).
Both count a task once however often it is re-processed. :func:`retry_redis` waits out a Redis
restart around a store call.

Redis keys (``<id>`` = run id; every key is named here, and every key expires)::

    gsam:run:<id>          hash: project, model_version, prompt, redo, status, total, done, failed,
                           skipped, created, updated, error, spec (JSON), chunk (tasks per job)
    gsam:run:<id>:tasks    set of the run's task ids
    gsam:run:<id>:done     set of task ids written back (or found already labeled)
    gsam:run:<id>:failed   hash task id -> reason
    gsam:run:<id>:jobs     set of the run's RQ job ids (:func:`jobs_key`, written by :mod:`backend.queue.jobs`)
    gsam:run:<id>:lease    the run's supervisor: its owner token (SET PX, :data:`LEASE_TTL_S`)
    gsam:run-index         sorted set run id -> when its record expires (pruned on read)
    gsam:lock:<project>:<task>:<sha1(model_version)[:16]>   write lock (SET NX, TTL)

A planning or running run's keys expire :data:`ACTIVE_TTL_S` (a day) after its supervisor last
touched them (:meth:`RedisRunStore.touch`, every minute while supervised), so a run nobody
supervises any more disappears by itself; finished and cancelled runs expire a week after they
end. The index key lives as long as its longest-lived member. Status values: ``planning`` (created by
:func:`backend.bulk.supervisor.start_prelabel_in_background`, tasks being listed), ``running``, ``done``,
``cancelled``, ``failed`` (the run itself could not go on, e.g. LS was unreachable while planning;
``error`` says why).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # backend.bulk.prelabel imports this module
    from backend.bulk.prelabel import PrelabelSpec

log = logging.getLogger(__name__)

RUN_PREFIX = "gsam:run:"
RUN_INDEX_KEY = "gsam:run-index"
LOCK_PREFIX = "gsam:lock:"
#: A writer refreshes its lock before each LS call (timeout 30 s, usually ~20 ms); a dead writer's
#: lock frees itself after this long.
LOCK_TTL_S = 45
RUN_TTL_S = 7 * 24 * 3600  # a finished run's record
ACTIVE_TTL_S = 24 * 3600  # a planning/running run's record, refreshed while it is supervised
#: A supervisor refreshes its run's lease every poll (0.5 s); a process of the deployment adopts a
#: run whose lease expired (its supervisor died: see :mod:`backend.bulk.supervisor`).
LEASE_TTL_S = 20.0
FAILURES_SHOWN = 100



def jobs_key(run_id: str) -> str:
    """The set of a run's RQ job ids."""
    return f"{RUN_PREFIX}{run_id}:jobs"


def lease_key(run_id: str) -> str:
    """Who supervises the run (owner token, expires unless refreshed)."""
    return f"{RUN_PREFIX}{run_id}:lease"


PLANNING, RUNNING, DONE, CANCELLED, FAILED = "planning", "running", "done", "cancelled", "failed"
FINAL = {DONE, CANCELLED, FAILED}


class WriteLockTimeout(RuntimeError):
    """Another writer held a task's write lock for longer than we waited, or took it over."""


class WriteLock:
    """What ``with store.write_lock(...) as lock`` gives: :meth:`refresh` before each slow step."""

    def __init__(self, task_id: int, refresh: Callable[[], bool] | None = None):
        self.task_id = task_id
        self._refresh = refresh

    def refresh(self) -> None:
        """Extend the lock's TTL. Raises :class:`WriteLockTimeout` when it expired meanwhile (another
        writer may have written the task since: better fail the task than write it twice)."""
        if self._refresh is not None and not self._refresh():
            raise WriteLockTimeout(f"task {self.task_id}: lost its write lock (held longer than its TTL)")


# ================================================================================== status

@dataclass
class RunStatus:
    """A run's progress. ``done`` counts tasks written back (or found labeled meanwhile), ``failed``
    tasks with a reason (``failures``: the first 100), ``skipped`` the project's tasks the planner
    left out because they already had a prediction of this model version."""

    id: str
    project: int
    status: str
    total: int
    done: int
    failed: int
    model_version: str
    skipped: int = 0
    created: float = 0.0
    updated: float = 0.0
    failures: dict[int, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done - self.failed)

    @property
    def images_per_second(self) -> float:
        """Tasks processed (done + failed) per second since the run was created."""
        processed = self.done + self.failed
        end = self.updated if self.status in FINAL else max(self.updated, time.time())
        elapsed = end - self.created
        return processed / elapsed if processed and elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if self.status == PLANNING:
            return None
        if self.remaining == 0:
            return 0.0
        if self.status != RUNNING:
            return None
        rate = self.images_per_second
        return self.remaining / rate if rate > 0 else None

    def to_json(self) -> dict:
        ips, eta = self.images_per_second, self.eta_seconds
        return {"id": self.id, "project": self.project, "status": self.status, "total": self.total,
                "done": self.done, "failed": self.failed, "remaining": self.remaining, "skipped": self.skipped,
                "images_per_second": round(ips, 3), "eta_seconds": None if eta is None else round(eta, 1),
                "failures": {str(k): v for k, v in self.failures.items()}, "model_version": self.model_version,
                "created": self.created, "updated": self.updated, "error": self.error}


# ================================================================================== run stores

class RunStore:
    """The interface both stores implement (see the module docstring for the semantics)."""

    def create(self, spec: PrelabelSpec, task_ids: Iterable[int] | None, *, skipped: int = 0,
               run_id: str | None = None, created: float | None = None, chunk: int | None = None) -> str:
        """A new run over ``task_ids`` (status ``running``), or ``planning`` when ``task_ids`` is None
        (then :meth:`set_tasks` follows). ``run_id`` (and ``created``) re-create a run under its old id.
        ``chunk`` (tasks per job) is kept for a supervisor that adopts the run."""
        raise NotImplementedError

    def set_tasks(self, run_id: str, task_ids: Iterable[int], *, skipped: int = 0) -> None:
        raise NotImplementedError

    def mark_done(self, run_id: str, task_id: int) -> bool:
        """Record the task as done (moving it out of failed); False if it already was."""
        raise NotImplementedError

    def mark_failed(self, run_id: str, task_id: int, reason: str) -> bool:
        """Record the task as failed with ``reason``; ignored (False) for a task already done."""
        raise NotImplementedError

    def is_done(self, run_id: str, task_id: int) -> bool:
        return task_id in self.done_among(run_id, [task_id])

    def done_among(self, run_id: str, task_ids: list[int]) -> set[int]:
        raise NotImplementedError

    def state(self, run_id: str) -> str | None:
        """The run's status string, or None for an unknown (expired, lost) run."""
        raise NotImplementedError

    def is_cancelled(self, run_id: str) -> bool:
        return self.state(run_id) == CANCELLED

    def cancel(self, run_id: str) -> bool:
        """Cancel a planning or running run; True if it was one."""
        raise NotImplementedError

    def finish(self, run_id: str, status: str = DONE, error: str | None = None) -> None:
        """Mark a planning/running run ``done`` (or ``failed`` with ``error``)."""
        raise NotImplementedError

    def status(self, run_id: str) -> RunStatus | None:
        raise NotImplementedError

    def pending(self, run_id: str) -> list[int]:
        """Task ids of the run that are neither done nor failed, ascending."""
        raise NotImplementedError

    def run_ids(self) -> list[str]:
        raise NotImplementedError

    def take_lease(self, run_id: str, owner: str, ttl: float = LEASE_TTL_S) -> bool:
        """Become (or stay) the run's supervisor: True when the lease was free or already ``owner``'s.
        One process per run (a memory store) needs no lease."""
        return True

    def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up (only if ``owner`` holds it)."""

    def touch(self, run_id: str) -> None:
        """A supervisor's sign of life: keeps a running run's record from expiring."""

    def write_lock(self, project: int, task_id: int, model_version: str, ttl: float = LOCK_TTL_S,
                   wait: float | None = None, owner: str | None = None) -> contextlib.AbstractContextManager:
        """Exclusive right to write ``task_id``'s prediction of ``model_version`` (``wait`` seconds,
        default ``ttl``, then :class:`WriteLockTimeout`). A lock left behind by the same ``owner``
        (a retry after Redis went away mid-write) is taken over instead of waited out."""
        raise NotImplementedError


def _new_run_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class _MemoryRun:
    spec: PrelabelSpec
    status: str
    tasks: set[int]
    skipped: int
    created: float
    updated: float
    done: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    error: str | None = None


class MemoryRunStore(RunStore):
    """Run records in this process (embedded mode); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._runs: dict[str, _MemoryRun] = {}
        self._held: dict[tuple, str] = {}
        self._held_changed = threading.Condition(threading.Lock())

    def create(self, spec, task_ids, *, skipped=0, run_id=None, created=None, chunk=None):
        run_id = run_id or _new_run_id()
        now = time.time()
        with self._lock:
            self._runs[run_id] = _MemoryRun(spec=spec, status=PLANNING if task_ids is None else RUNNING,
                                            tasks={int(t) for t in task_ids or ()}, skipped=skipped,
                                            created=created or now, updated=now)
        return run_id

    def set_tasks(self, run_id, task_ids, *, skipped=0):
        with self._lock:
            run = self._runs[run_id]
            run.tasks = {int(t) for t in task_ids}
            run.skipped = skipped
            run.created = run.updated = time.time()
            if run.status == PLANNING:
                run.status = RUNNING

    def mark_done(self, run_id, task_id):
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or task_id in run.done:
                return False
            run.failed.pop(task_id, None)
            run.done.add(task_id)
            run.updated = time.time()
            return True

    def mark_failed(self, run_id, task_id, reason):
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or task_id in run.done:
                return False
            new = task_id not in run.failed
            run.failed[task_id] = reason
            run.updated = time.time()
            return new

    def done_among(self, run_id, task_ids):
        with self._lock:
            run = self._runs.get(run_id)
            return set() if run is None else {t for t in task_ids if t in run.done}

    def state(self, run_id):
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else run.status

    def cancel(self, run_id):
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.status not in (PLANNING, RUNNING):
                return False
            run.status, run.updated = CANCELLED, time.time()
            return True

    def finish(self, run_id, status=DONE, error=None):
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None and run.status in (PLANNING, RUNNING):
                run.status, run.error, run.updated = status, error, time.time()

    def status(self, run_id):
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            failures = dict(sorted(run.failed.items())[:FAILURES_SHOWN])
            return RunStatus(id=run_id, project=run.spec.project, status=run.status, total=len(run.tasks),
                             done=len(run.done), failed=len(run.failed), model_version=run.spec.model_version,
                             skipped=run.skipped, created=run.created, updated=run.updated, failures=failures,
                             error=run.error)

    def pending(self, run_id):
        with self._lock:
            run = self._runs.get(run_id)
            return [] if run is None else sorted(run.tasks - run.done - set(run.failed))

    def run_ids(self):
        with self._lock:
            return list(self._runs)

    @contextlib.contextmanager
    def write_lock(self, project, task_id, model_version, ttl=LOCK_TTL_S, wait=None, owner=None):
        key = (project, task_id, model_version)
        token = owner or uuid.uuid4().hex
        deadline = time.monotonic() + (ttl if wait is None else wait)
        with self._held_changed:
            while self._held.get(key, token) != token:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WriteLockTimeout(f"task {task_id}: another writer holds its write lock")
                self._held_changed.wait(left)
            self._held[key] = token
        try:
            yield WriteLock(task_id)
        finally:
            with self._held_changed:
                if self._held.get(key) == token:
                    del self._held[key]
                self._held_changed.notify_all()


_MARK_DONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local added = redis.call('SADD', KEYS[2], ARGV[1])
if added == 1 then
  redis.call('HINCRBY', KEYS[1], 'done', 1)
  if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'failed', -1) end
end
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and redis.call('PTTL', KEYS[2]) == -1 then redis.call('PEXPIRE', KEYS[2], ttl) end
return added
"""

_MARK_FAILED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
local new = redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if new == 1 then redis.call('HINCRBY', KEYS[1], 'failed', 1) end
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and redis.call('PTTL', KEYS[3]) == -1 then redis.call('PEXPIRE', KEYS[3], ttl) end
return new
"""

_SET_STATUS_IF = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated', ARGV[2])
    return 1
  end
end
return 0
"""

_ACQUIRE_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_REFRESH_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRunStore(RunStore):
    """Run records in Redis (queue mode), shared by the supervisor, the workers and the web process.

    Every update is one atomic command or Lua script, so concurrent workers never double-count.
    """

    def __init__(self, connection) -> None:
        self.r = connection
        self._mark_done = connection.register_script(_MARK_DONE)
        self._mark_failed = connection.register_script(_MARK_FAILED)
        self._set_status_if = connection.register_script(_SET_STATUS_IF)
        self._acquire = connection.register_script(_ACQUIRE_LOCK)
        self._refresh = connection.register_script(_REFRESH_LOCK)
        self._release = connection.register_script(_RELEASE_LOCK)

    @staticmethod
    def _keys(run_id: str) -> tuple[str, str, str, str]:
        base = RUN_PREFIX + run_id
        return base, base + ":done", base + ":failed", base + ":tasks"

    def create(self, spec, task_ids, *, skipped=0, run_id=None, created=None, chunk=None):
        run_id = run_id or _new_run_id()
        meta_key, done_key, failed_key, tasks_key = self._keys(run_id)
        ids = None if task_ids is None else [int(t) for t in task_ids]
        now = time.time()
        meta = {"project": spec.project, "model_version": spec.model_version, "prompt": spec.prompt or "",
                "redo": int(spec.redo), "status": PLANNING if ids is None else RUNNING,
                "total": len(ids or ()), "done": 0, "failed": 0, "skipped": skipped, "created": created or now,
                "updated": now, "error": "", "spec": json.dumps(spec.to_dict()), "chunk": int(chunk or 0)}
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(meta_key, done_key, failed_key, tasks_key)
            for start in range(0, len(ids or ()), 5000):
                pipe.sadd(tasks_key, *ids[start:start + 5000])
            pipe.hset(meta_key, mapping=meta)
            pipe.expire(meta_key, ACTIVE_TTL_S)
            pipe.expire(tasks_key, ACTIVE_TTL_S)
            self._index(pipe, run_id, ACTIVE_TTL_S)
            pipe.execute()
        return run_id

    @staticmethod
    def _index(pipe, run_id: str, ttl_s: int) -> None:
        """Record in the runs index that ``run_id`` lives ``ttl_s`` more seconds; the index itself
        lives as long as its longest-lived member (no member outlives a week from its last write)."""
        now = time.time()
        pipe.zadd(RUN_INDEX_KEY, {run_id: now + ttl_s})
        pipe.expire(RUN_INDEX_KEY, RUN_TTL_S)  # >= every member's expiry: none is more than a week off

    def set_tasks(self, run_id, task_ids, *, skipped=0):
        meta_key, _, _, tasks_key = self._keys(run_id)
        ids = [int(t) for t in task_ids]
        now = time.time()
        with self.r.pipeline(transaction=True) as pipe:
            for start in range(0, len(ids), 5000):
                pipe.sadd(tasks_key, *ids[start:start + 5000])
            pipe.hset(meta_key, mapping={"total": len(ids), "skipped": skipped, "created": now, "updated": now})
            pipe.expire(tasks_key, ACTIVE_TTL_S)
            pipe.execute()
        self._set_status_if(keys=[meta_key], args=[RUNNING, now, PLANNING])

    def mark_done(self, run_id, task_id):
        meta_key, done_key, failed_key, _ = self._keys(run_id)
        result = self._mark_done(keys=[meta_key, done_key, failed_key], args=[int(task_id), time.time()])
        if result == -1:
            log.warning("run %s is unknown (expired or lost): task %s not recorded", run_id, task_id)
        return result == 1

    def mark_failed(self, run_id, task_id, reason):
        meta_key, done_key, failed_key, _ = self._keys(run_id)
        result = self._mark_failed(keys=[meta_key, done_key, failed_key],
                                   args=[int(task_id), str(reason)[:2000], time.time()])
        if result == -1:
            log.warning("run %s is unknown (expired or lost): task %s not recorded", run_id, task_id)
        return result == 1

    def done_among(self, run_id, task_ids):
        if not task_ids:
            return set()
        _, done_key, _, _ = self._keys(run_id)
        flags = self.r.smismember(done_key, [int(t) for t in task_ids])
        return {int(t) for t, flag in zip(task_ids, flags) if flag}

    def state(self, run_id):
        value = self.r.hget(RUN_PREFIX + run_id, "status")
        return None if value is None else _text(value)

    def cancel(self, run_id):
        changed = bool(self._set_status_if(keys=[RUN_PREFIX + run_id], args=[CANCELLED, time.time(), PLANNING,
                                                                                  RUNNING]))
        if changed:
            self._expire_later(run_id)
        return changed

    def finish(self, run_id, status=DONE, error=None):
        meta_key = RUN_PREFIX + run_id
        if error:
            self.r.hset(meta_key, "error", error[:2000])
        if self._set_status_if(keys=[meta_key], args=[status, time.time(), PLANNING, RUNNING]):
            self._expire_later(run_id)

    def _expire_later(self, run_id: str) -> None:
        with self.r.pipeline(transaction=False) as pipe:
            for key in (*self._keys(run_id), jobs_key(run_id)):
                pipe.expire(key, RUN_TTL_S)
            pipe.delete(lease_key(run_id))
            self._index(pipe, run_id, RUN_TTL_S)
            pipe.execute()

    def touch(self, run_id):
        if self.state(run_id) not in (PLANNING, RUNNING):
            return
        with self.r.pipeline(transaction=False) as pipe:
            for key in (*self._keys(run_id), jobs_key(run_id)):
                pipe.expire(key, ACTIVE_TTL_S)
            self._index(pipe, run_id, ACTIVE_TTL_S)
            pipe.execute()

    def take_lease(self, run_id, owner, ttl=LEASE_TTL_S):
        return bool(self._acquire(keys=[lease_key(run_id)], args=[owner, max(1, int(ttl * 1000))]))

    def release_lease(self, run_id, owner):
        self._release(keys=[lease_key(run_id)], args=[owner])

    def lease_holder(self, run_id: str) -> str | None:
        value = self.r.get(lease_key(run_id))
        return None if value is None else _text(value)

    def status(self, run_id):
        meta_key, done_key, failed_key, tasks_key = self._keys(run_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.scard(tasks_key)
            pipe.scard(done_key)
            pipe.hlen(failed_key)
            raw, total, done, failed = pipe.execute()
        if not raw:
            return None
        meta = {_text(k): _text(v) for k, v in raw.items()}
        failures: dict[int, str] = {}
        if failed:
            for task_id, reason in self.r.hscan_iter(failed_key, count=FAILURES_SHOWN):
                failures[int(_text(task_id))] = _text(reason)
                if len(failures) >= FAILURES_SHOWN:
                    break
        return RunStatus(id=run_id, project=int(meta.get("project", 0)), status=meta.get("status", ""),
                         total=int(total), done=int(done), failed=int(failed),
                         model_version=meta.get("model_version", ""), skipped=int(meta.get("skipped") or 0),
                         created=float(meta.get("created") or 0), updated=float(meta.get("updated") or 0),
                         failures=dict(sorted(failures.items())), error=meta.get("error") or None)

    def spec(self, run_id: str) -> PrelabelSpec | None:
        from backend.bulk.prelabel import PrelabelSpec  # not at the top: backend.bulk.prelabel imports this module

        raw = self.r.hget(RUN_PREFIX + run_id, "spec")
        return None if raw is None else PrelabelSpec.from_dict(json.loads(_text(raw)))

    def chunk(self, run_id: str) -> int | None:
        """Tasks per job the run was started with (None: unknown)."""
        raw = self.r.hget(RUN_PREFIX + run_id, "chunk")
        return int(_text(raw)) if raw is not None and int(_text(raw)) > 0 else None

    def pending(self, run_id):
        _, done_key, failed_key, tasks_key = self._keys(run_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.sdiff(tasks_key, done_key)
            pipe.hkeys(failed_key)
            not_done, failed = pipe.execute()
        failed_ids = {int(_text(t)) for t in failed}
        return sorted(int(_text(t)) for t in not_done if int(_text(t)) not in failed_ids)

    def run_ids(self):
        self.r.zremrangebyscore(RUN_INDEX_KEY, "-inf", time.time())
        ids = [_text(i) for i in self.r.zrange(RUN_INDEX_KEY, 0, -1)]
        with self.r.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.exists(RUN_PREFIX + run_id)
            alive = pipe.execute()
        gone = [run_id for run_id, exists in zip(ids, alive) if not exists]
        if gone:
            self.r.zrem(RUN_INDEX_KEY, *gone)
        return sorted(run_id for run_id, exists in zip(ids, alive) if exists)

    def active_run_ids(self) -> list[str]:
        """Runs still planning or running (candidates for adoption when their lease expired)."""
        ids = self.run_ids()
        with self.r.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hget(RUN_PREFIX + run_id, "status")
            states = pipe.execute()
        return [run_id for run_id, state in zip(ids, states) if state is not None and _text(state) in (PLANNING,
                                                                                                          RUNNING)]

    @staticmethod
    def lock_key(project: int, task_id: int, model_version: str) -> str:
        digest = hashlib.sha1(model_version.encode()).hexdigest()[:16]
        return f"{LOCK_PREFIX}{project}:{task_id}:{digest}"

    @contextlib.contextmanager
    def write_lock(self, project, task_id, model_version, ttl=LOCK_TTL_S, wait=None, owner=None):
        key = self.lock_key(project, task_id, model_version)
        token = owner or uuid.uuid4().hex
        deadline = time.monotonic() + (ttl if wait is None else wait)
        ttl_ms = max(1, int(ttl * 1000))
        pause = 0.02
        while not self._acquire(keys=[key], args=[token, ttl_ms]):
            if time.monotonic() >= deadline:
                raise WriteLockTimeout(f"task {task_id}: another writer holds its write lock")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        try:
            yield WriteLock(task_id, lambda: bool(self._refresh(keys=[key], args=[token, ttl_ms])))
        finally:
            try:
                self._release(keys=[key], args=[token])
            except Exception as exc:  # the lock expires by itself
                log.warning("could not release the write lock of task %s (%s)", task_id, type(exc).__name__)


__all__ = ["ACTIVE_TTL_S", "CANCELLED", "DONE", "FAILED", "FINAL", "LEASE_TTL_S", "PLANNING", "RUNNING", "MemoryRunStore",
           "RedisRunStore", "RunStatus", "RunStore", "WriteLock", "WriteLockTimeout", "jobs_key", "lease_key"]
