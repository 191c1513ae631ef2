"""Bulk pre-labeling of a whole Label Studio project.

A *run* labels the tasks of one project with one model version:

1. **plan** (:func:`plan_prelabel`): list the project's tasks with the model versions of their
   predictions (one cheap paginated Data Manager query, see :mod:`backend.lsclient`) and keep those
   without a prediction of the current ``model_version`` (all of them with ``redo``);
2. **process** (:func:`process_chunk`), chunk by chunk: run the pipeline on the chunk, then write
   each task's prediction back to LS (:func:`write_prediction`) and record the task as done, or as
   failed with its reason when its image could not be used (a *poison* task fails alone; it gets no
   prediction, so a later run retries it);
3. **supervise** (:func:`run_prelabel`): embedded (no ``REDIS_URL``) the chunks run in this
   process; in queue mode they are RQ jobs on the ``prelabel`` queue (:mod:`backend.jobs`) and this
   process follows the run's progress in Redis, shows it as a tqdm bar, survives Redis restarts,
   re-enqueues lost work, and cancels the run on Ctrl-C.

**Idempotent write-back.** A task gets at most one prediction per model version, even when a chunk
runs twice (an RQ retry after a lost worker, a supervisor re-enqueue) or two workers race on it:
the write happens under a per-(project, task, model_version) lock (Redis ``SET NX`` with a TTL in
queue mode), and under that lock the writer skips tasks this run already recorded as done and asks
LS which predictions the task has before creating one.

**Redo semantics.** ``redo`` makes the planner include tasks that already have a prediction of this
model version. For such a task the writer, under the lock, creates the new prediction first and
then deletes the task's other predictions *of the same model version* (those of other versions are
untouched). Creating before deleting means a task never goes without a prediction, and a crash in
between leaves two that the next attempt collapses to one again. A chunk that runs twice in the
same run replaces nothing twice: the second copy finds the task done in the run's store.

**Run records** live in a :class:`RunStore`: :class:`RedisRunStore` (queue mode; keys below) or
:class:`MemoryRunStore` (embedded mode). Both count a task once however often it is re-processed.

Redis keys (``<id>`` = run id)::

    gsam:run:<id>          hash: project, model_version, prompt, redo, status, total, done, failed,
                           skipped, created, updated, error, spec (JSON)
    gsam:run:<id>:tasks    set of the run's task ids
    gsam:run:<id>:done     set of task ids written back (or found already labeled)
    gsam:run:<id>:failed   hash task id -> reason
    gsam:runs              set of all run ids
    gsam:lock:<project>:<task>:<sha1(model_version)[:16]>   write lock (SET NX, TTL)

Finished and cancelled runs expire after a week. Status values: ``planning`` (created by
:func:`start_prelabel_in_background`, tasks being listed), ``running``, ``done``, ``cancelled``,
``failed`` (the run itself could not go on, e.g. LS was unreachable while planning; ``error`` says why).

This module never imports torch: the pipeline (and through it the models) is created only for
embedded runs, and only when a chunk is processed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from backend.labelconfig import LabelConfigError, parse_label_config
from backend.lsclient import LabelStudioApi, LabelStudioApiError, LabelStudioUnavailable
from backend.pipeline import model_version as settings_model_version, prompt_limits
from backend.settings import Settings
from backend.tasks import PredictRequest, RequestError, split_prompt

log = logging.getLogger(__name__)

RUN_PREFIX = "gsam:run:"
RUNS_KEY = "gsam:runs"
LOCK_PREFIX = "gsam:lock:"
#: A writer refreshes its lock before each LS call (timeout 30 s, usually ~20 ms); a dead writer's
#: lock frees itself after this long.
LOCK_TTL_S = 45
RUN_TTL_S = 7 * 24 * 3600
FAILURES_SHOWN = 100
POLL_S = 0.5
#: No progress for this long while no job of the run is queued, scheduled or running = stalled.
STALL_S = 15.0
#: Re-enqueue rounds in a row without any progress before the rest is given up as failed.
MAX_REQUEUE_ROUNDS = 3
REDIS_RETRY_S = 60.0  # how long a worker-side store call waits out a Redis restart
_PROMPT_FROM_NAME = "__prelabel_prompt__"

PLANNING, RUNNING, DONE, CANCELLED, FAILED = "planning", "running", "done", "cancelled", "failed"
FINAL = {DONE, CANCELLED, FAILED}


class PrelabelError(RuntimeError):
    """The run cannot start as asked (bad project config, bad prompt, bad chunk size); the message
    says what to fix (an HTTP 400 for ``POST /prelabel``)."""


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


# ================================================================================== spec, status

@dataclass(frozen=True)
class PrelabelSpec:
    """What a run does; travels with every RQ job, so it is JSON-safe (:meth:`to_dict`)."""

    project: int
    label_config: str
    prompt: str | None
    model_version: str
    redo: bool = False

    def to_dict(self) -> dict:
        return {"project": self.project, "label_config": self.label_config, "prompt": self.prompt,
                "model_version": self.model_version, "redo": self.redo}

    @classmethod
    def from_dict(cls, data: dict) -> "PrelabelSpec":
        prompt = data.get("prompt")
        return cls(project=int(data["project"]), label_config=str(data["label_config"]),
                   prompt=str(prompt) if prompt else None, model_version=str(data["model_version"]),
                   redo=bool(data.get("redo", False)))


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
               run_id: str | None = None, created: float | None = None) -> str:
        """A new run over ``task_ids`` (status ``running``), or ``planning`` when ``task_ids`` is None
        (then :meth:`set_tasks` follows). ``run_id`` (and ``created``) re-create a run under its old id."""
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

    def create(self, spec, task_ids, *, skipped=0, run_id=None, created=None):
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
return added
"""

_MARK_FAILED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
local new = redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if new == 1 then redis.call('HINCRBY', KEYS[1], 'failed', 1) end
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
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

    def create(self, spec, task_ids, *, skipped=0, run_id=None, created=None):
        run_id = run_id or _new_run_id()
        meta_key, done_key, failed_key, tasks_key = self._keys(run_id)
        ids = None if task_ids is None else [int(t) for t in task_ids]
        now = time.time()
        meta = {"project": spec.project, "model_version": spec.model_version, "prompt": spec.prompt or "",
                "redo": int(spec.redo), "status": PLANNING if ids is None else RUNNING,
                "total": len(ids or ()), "done": 0, "failed": 0, "skipped": skipped, "created": created or now,
                "updated": now, "error": "", "spec": json.dumps(spec.to_dict())}
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(meta_key, done_key, failed_key, tasks_key)
            for start in range(0, len(ids or ()), 5000):
                pipe.sadd(tasks_key, *ids[start:start + 5000])
            pipe.hset(meta_key, mapping=meta)
            pipe.sadd(RUNS_KEY, run_id)
            pipe.execute()
        return run_id

    def set_tasks(self, run_id, task_ids, *, skipped=0):
        meta_key, _, _, tasks_key = self._keys(run_id)
        ids = [int(t) for t in task_ids]
        now = time.time()
        with self.r.pipeline(transaction=True) as pipe:
            for start in range(0, len(ids), 5000):
                pipe.sadd(tasks_key, *ids[start:start + 5000])
            pipe.hset(meta_key, mapping={"total": len(ids), "skipped": skipped, "created": now, "updated": now})
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
            for key in (*self._keys(run_id), RUN_PREFIX + run_id + ":jobs"):
                pipe.expire(key, RUN_TTL_S)
            pipe.execute()

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
        raw = self.r.hget(RUN_PREFIX + run_id, "spec")
        return None if raw is None else PrelabelSpec.from_dict(json.loads(_text(raw)))

    def pending(self, run_id):
        _, done_key, failed_key, tasks_key = self._keys(run_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.sdiff(tasks_key, done_key)
            pipe.hkeys(failed_key)
            not_done, failed = pipe.execute()
        failed_ids = {int(_text(t)) for t in failed}
        return sorted(int(_text(t)) for t in not_done if int(_text(t)) not in failed_ids)

    def run_ids(self):
        ids = [_text(i) for i in self.r.smembers(RUNS_KEY)]
        with self.r.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.exists(RUN_PREFIX + run_id)
            alive = pipe.execute()
        gone = [run_id for run_id, exists in zip(ids, alive) if not exists]
        if gone:
            self.r.srem(RUNS_KEY, *gone)
        return sorted(run_id for run_id, exists in zip(ids, alive) if exists)

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


def _redis_transient() -> tuple[type[BaseException], ...]:
    try:
        import redis
    except ImportError:  # embedded installs without redis-py
        return ()
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


def _retry_redis(fn: Callable[[], Any], what: str, patience_s: float = REDIS_RETRY_S) -> Any:
    """``fn()``, waiting out a Redis restart for up to ``patience_s`` (then the error propagates)."""
    transient = _redis_transient()
    deadline = time.monotonic() + patience_s
    pause = 0.5
    while True:
        try:
            return fn()
        except transient as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


# ================================================================================== planning

@dataclass
class PrelabelPlan:
    tasks: list[dict]  # {"id": int, "data": {...}} of the tasks to label, ascending id
    skipped: int  # tasks left out because they already have a prediction of the model version


def plan_prelabel(api: LabelStudioApi, project: int, model_version: str, redo: bool,
                  page_size: int = 100) -> PrelabelPlan:
    tasks, skipped = [], 0
    for ref in api.iter_tasks(project, page_size=page_size):
        if not redo:
            has = ref.has_version(model_version)
            if has is None:  # the DM string was ambiguous for this version: ask exactly
                has = model_version in api.prediction_versions(ref.id)
            if has:
                skipped += 1
                continue
        tasks.append({"id": ref.id, "data": ref.data})
    return PrelabelPlan(tasks=tasks, skipped=skipped)


def plan_tasks_to_label(api: LabelStudioApi, project: int, model_version: str, redo: bool) -> list[dict]:
    """The tasks (id + data) a run labels: those without a prediction of ``model_version``, or all."""
    return plan_prelabel(api, project, model_version, redo).tasks


# ================================================================================== processing

def build_request(spec: PrelabelSpec, tasks: list[dict]) -> PredictRequest:
    """The pipeline request for a chunk: the prompt as a TextArea result of the config's prompt tag
    (a synthetic one when the config has no TextArea), or no context so the labels are the prompt."""
    config = parse_label_config(spec.label_config)
    context = None
    if spec.prompt and spec.prompt.strip():
        if not config.prompt_name:
            config = dataclasses.replace(config, prompt_name=_PROMPT_FROM_NAME)
        context = {"result": [{"from_name": config.prompt_name, "to_name": config.image_name, "type": "textarea",
                               "value": {"text": [spec.prompt]}}]}
    return PredictRequest(tasks=[{"id": t["id"], "data": t.get("data") or {}} for t in tasks], config=config,
                          context=context, project=str(spec.project))


def write_prediction(api: LabelStudioApi, store: RunStore, run_id: str, spec: PrelabelSpec, task_id: int,
                     prediction: dict, owner: str | None = None) -> str:
    """Write one task's prediction idempotently and record it as done. Returns what happened:
    ``created``, ``replaced`` (redo), ``kept`` (LS already had one of this version) or ``already``
    (this run recorded it done, e.g. a racing copy of the chunk).

    Raises :class:`LabelStudioApiError` (the task's own problem, e.g. deleted meanwhile),
    :class:`LabelStudioUnavailable` (worth retrying the chunk) or :class:`WriteLockTimeout`.
    """
    with store.write_lock(spec.project, task_id, spec.model_version, owner=owner) as lock:
        if store.is_done(run_id, task_id):
            return "already"
        existing = [pid for pid, version in api.predictions(task_id) if version == spec.model_version]
        if existing and not spec.redo:
            store.mark_done(run_id, task_id)
            return "kept"
        lock.refresh()
        _create_checked(api, task_id, {**prediction, "model_version": spec.model_version}, existing, lock)
        for prediction_id in existing:
            lock.refresh()
            api.delete_prediction(prediction_id)
        store.mark_done(run_id, task_id)
        return "replaced" if existing else "created"


def _create_checked(api: LabelStudioApi, task_id: int, prediction: dict, existing: list[int],
                    lock: WriteLock) -> int:
    """Create a prediction once. When the answer was lost (timeout, 5xx) LS may have stored it
    anyway: look before raising, so that a retry never leaves two."""
    try:
        return api.create_prediction(task_id, prediction)
    except LabelStudioUnavailable:
        try:
            lock.refresh()
            mine = [pid for pid, version in api.predictions(task_id)
                    if version == prediction["model_version"] and pid not in existing]
        except LabelStudioApiError:
            mine = []
        if not mine:
            raise
        for extra in mine[1:]:
            api.delete_prediction(extra)
        return mine[0]


def process_chunk(pipeline, api: LabelStudioApi, store: RunStore, run_id: str, spec: PrelabelSpec,
                  tasks: list[dict]) -> None:
    """Label one chunk and write its predictions back (what a ``prelabel`` RQ job does).

    Skips the chunk when the run is not running (cancelled, finished, unknown) and the tasks this
    run already recorded done. A task whose image fails is recorded failed with the reason and gets
    no prediction. Raises (so RQ retries the chunk; done tasks are then skipped) when LS is
    unreachable or the pipeline itself fails.
    """
    state = _retry_redis(lambda: store.state(run_id), f"run {run_id}")
    if state != RUNNING:
        log.info("run %s is %s: skipping a chunk of %d tasks", run_id, state or "unknown", len(tasks))
        return
    done = _retry_redis(lambda: store.done_among(run_id, [int(t["id"]) for t in tasks]), f"run {run_id}")
    todo = [t for t in tasks if int(t["id"]) not in done]
    if not todo:
        return
    if pipeline.model_version != spec.model_version:
        reason = (f"this worker serves model_version {pipeline.model_version!r} but the run labels with "
                  f"{spec.model_version!r}: give workers and the prelabel command the same model settings")
        for task in todo:
            _retry_redis(lambda: store.mark_failed(run_id, int(task["id"]), reason), f"run {run_id}")
        return
    try:
        request = build_request(spec, todo)
        outcomes = pipeline.predict_outcomes(request)
    except (RequestError, LabelConfigError) as exc:  # the same for every task: no retry helps
        for task in todo:
            _retry_redis(lambda: store.mark_failed(run_id, int(task["id"]), str(exc)), f"run {run_id}")
        return
    counts: dict[str, int] = {}
    owner = uuid.uuid4().hex  # this attempt's locks: its own retries may take them over
    for task, outcome in zip(todo, outcomes):
        task_id = int(task["id"])
        if _retry_redis(lambda: store.is_cancelled(run_id), f"run {run_id}"):
            log.info("run %s cancelled: not writing the rest of its chunk", run_id)
            return
        if outcome.error:
            _retry_redis(lambda: store.mark_failed(run_id, task_id, outcome.error), f"run {run_id}")
            counts["failed"] = counts.get("failed", 0) + 1
            continue
        try:
            what = _retry_redis(
                lambda: write_prediction(api, store, run_id, spec, task_id, outcome.prediction, owner),
                f"run {run_id}")
        except LabelStudioUnavailable:
            raise
        except (LabelStudioApiError, WriteLockTimeout) as exc:
            _retry_redis(lambda: store.mark_failed(run_id, task_id, f"write-back failed: {exc}"), f"run {run_id}")
            counts["failed"] = counts.get("failed", 0) + 1
            continue
        counts[what] = counts.get(what, 0) + 1
    log.info("run %s: chunk of %d tasks: %s", run_id, len(todo),
             ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing to do")


# ================================================================================== driving a run

def _prepare(settings: Settings, project: int, prompt: str | None, redo: bool, chunk: int,
             api: LabelStudioApi | None) -> tuple[LabelStudioApi, PrelabelSpec]:
    if not isinstance(chunk, int) or chunk < 1 or chunk > 1024:
        raise PrelabelError(f"chunk={chunk!r}: use a number of tasks per job between 1 and 1024")
    api = api or LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key)
    config_xml = api.label_config(project)
    try:
        parse_label_config(config_xml)
    except LabelConfigError as exc:
        raise PrelabelError(f"project {project}: {exc}") from None
    prompt = prompt.strip() if prompt and prompt.strip() else None
    if prompt:
        try:
            if not split_prompt(prompt, prompt_limits(settings)):
                prompt = None
        except RequestError as exc:
            raise PrelabelError(str(exc)) from None
    return api, PrelabelSpec(project=int(project), label_config=config_xml, prompt=prompt,
                             model_version=settings_model_version(settings), redo=bool(redo))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _Bar:
    """The tqdm bar (done + failed out of total), or nothing when ``progress`` is off."""

    def __init__(self, enabled: bool, total: int, project: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=f"pre-label project {project}", dynamic_ncols=True,
                            smoothing=0.1)

    def show(self, status: RunStatus | None, note: str | None = None) -> None:
        if self.bar is None:
            return
        if status is not None:
            if self.bar.total != status.total:
                self.bar.total = status.total
            processed = status.done + status.failed
            if processed > self.bar.n:
                self.bar.update(processed - self.bar.n)
            postfix = {"done": status.done, "failed": status.failed, "remaining": status.remaining}
        else:
            postfix = {}
        if note:
            postfix["note"] = note
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _embedded(settings: Settings, api: LabelStudioApi, spec: PrelabelSpec, plan: PrelabelPlan, chunk: int,
              progress: bool, store: RunStore | None, pipeline, run_id: str | None = None) -> RunStatus:
    store = store or MemoryRunStore()
    if run_id is None:
        run_id = store.create(spec, [t["id"] for t in plan.tasks], skipped=plan.skipped)
    else:
        store.set_tasks(run_id, [t["id"] for t in plan.tasks], skipped=plan.skipped)
    bar = _Bar(progress, len(plan.tasks), spec.project)
    try:
        for tasks in _chunks(plan.tasks, chunk):
            if store.state(run_id) != RUNNING:
                break
            if pipeline is None:
                from backend.pipeline import Pipeline

                pipeline = Pipeline(settings)
            try:
                process_chunk(pipeline, api, store, run_id, spec, tasks)
            except Exception as exc:  # one bad chunk must not end the run: record why, go on
                log.exception("run %s: a chunk of %d tasks failed", run_id, len(tasks))
                reason = f"chunk failed: {exc}" if isinstance(exc, LabelStudioApiError) else \
                    f"chunk failed: {type(exc).__name__}: {exc}"
                for task in tasks:
                    if not store.is_done(run_id, int(task["id"])):
                        store.mark_failed(run_id, int(task["id"]), reason)
            bar.show(store.status(run_id))
        store.finish(run_id)
    except KeyboardInterrupt:
        store.cancel(run_id)
        log.warning("run %s cancelled", run_id)
    finally:
        bar.show(store.status(run_id))
        bar.close()
    return store.status(run_id)


class _Supervisor:
    """Queue mode: enqueue the chunks, then follow the run in Redis until it ends (see module doc)."""

    def __init__(self, connection, store: RunStore, run_id: str, spec: PrelabelSpec, tasks: list[dict],
                 chunk: int, api: LabelStudioApi | None, poll_s: float, stall_s: float):
        self.connection = connection
        self.store = store
        self.run_id = run_id
        self.spec = spec
        self.tasks_by_id = {int(t["id"]): t for t in tasks}
        self.chunk = chunk
        self.api = api
        self.poll_s = poll_s
        self.stall_s = stall_s
        self.outbox: list[list[dict]] = list(_chunks(tasks, chunk))  # chunks still to enqueue
        self.requeue_rounds = 0
        self.last: RunStatus | None = None

    def _enqueue_outbox(self) -> None:
        from backend import jobs

        while self.outbox:
            jobs.enqueue_prelabel_chunk(self.connection, self.run_id, self.spec, self.outbox[0])
            self.outbox.pop(0)

    def _recreate(self) -> None:
        """The run vanished from Redis (restarted without persistence, flushed): create it again
        under its id. Without redo, tasks LS already holds a prediction of this version for are
        recorded done at once instead of being labeled again."""
        log.warning("run %s vanished from Redis: re-creating it and re-enqueueing its tasks", self.run_id)
        ids = sorted(self.tasks_by_id)
        self.store.create(self.spec, ids, skipped=self.last.skipped if self.last else 0, run_id=self.run_id,
                          created=self.last.created if self.last else None)
        todo = set(ids)
        if not self.spec.redo and self.api is not None:
            try:
                for ref in self.api.iter_tasks(self.spec.project):
                    if ref.id in todo and ref.has_version(self.spec.model_version):
                        self.store.mark_done(self.run_id, ref.id)
                        todo.discard(ref.id)
            except LabelStudioApiError as exc:
                log.warning("run %s: could not check LS for tasks labeled meanwhile: %s", self.run_id, exc)
        self.outbox = list(_chunks([self.tasks_by_id[i] for i in sorted(todo)], self.chunk))

    def _requeue_pending(self) -> None:
        pending = self.store.pending(self.run_id)
        self.requeue_rounds += 1
        size = max(1, self.chunk >> (self.requeue_rounds - 1))  # smaller chunks isolate a task that crashes
        log.warning("run %s stalled with %d tasks pending and no job in flight: re-enqueueing them "
                    "(round %d, %d per job)", self.run_id, len(pending), self.requeue_rounds, size)
        self.outbox.extend(_chunks([self.tasks_by_id[i] for i in pending if i in self.tasks_by_id], size))

    def _give_up(self) -> None:
        pending = self.store.pending(self.run_id)
        reason = (f"not processed: {MAX_REQUEUE_ROUNDS} re-enqueues in a row made no progress "
                  "(check the workers' logs; is `python -m backend worker` running?)")
        log.error("run %s: giving up on %d tasks: %s", self.run_id, len(pending), reason)
        for task_id in pending:
            self.store.mark_failed(self.run_id, task_id, reason)

    def step(self) -> RunStatus | None:
        """One supervision round; the final status when the run has ended, else None."""
        from backend import jobs

        self._enqueue_outbox()
        status = self.store.status(self.run_id)
        if status is None:
            self._recreate()
            self._enqueue_outbox()
            self.last_change = time.monotonic()
            return None
        if status.status in FINAL:
            return status
        processed = status.done + status.failed
        if self.last is None or processed != self.last.done + self.last.failed:
            self.last_change = time.monotonic()
            if self.last is not None:
                self.requeue_rounds = 0
        self.last = status
        if status.status == RUNNING and processed >= status.total:
            self.store.finish(self.run_id)
            return self.store.status(self.run_id)
        if time.monotonic() - self.last_change > self.stall_s and jobs.run_jobs_in_flight(
                self.connection, self.run_id) == 0:
            if self.requeue_rounds >= MAX_REQUEUE_ROUNDS:
                self._give_up()
            else:
                self._requeue_pending()
            self.last_change = time.monotonic()
        return None

    def run(self, progress: bool) -> RunStatus:
        transient = _redis_transient()
        bar = _Bar(progress, len(self.tasks_by_id), self.spec.project)
        self.last_change = time.monotonic()
        pause = 0.5
        note = None
        try:
            while True:
                try:
                    final = self.step()
                    if final is not None:
                        bar.show(final)
                        return final
                    note = self._note()
                    pause = 0.5
                except transient as exc:
                    note = f"Redis unreachable ({type(exc).__name__}), reconnecting"
                    log.warning("run %s: %s in %.1f s", self.run_id, note, pause)
                    bar.show(self.last, note)
                    time.sleep(pause)
                    pause = min(pause * 2, 10.0)
                    self.last_change = time.monotonic()  # an outage is not a stall: workers reconnect too
                    continue
                bar.show(self.last, note)
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            return self._cancel()
        finally:
            bar.close()

    def _note(self) -> str | None:
        from backend import jobs

        try:
            return None if jobs.live_workers(self.connection) else "no live worker"
        except Exception:
            return None

    def _cancel(self) -> RunStatus:
        log.warning("run %s: cancelling", self.run_id)
        try:
            cancel_run(self.store, self.run_id, self.connection)
            status = self.store.status(self.run_id)
        except Exception as exc:
            log.error("run %s: could not cancel it in Redis (%s)", self.run_id, type(exc).__name__)
            status = None
        if status is None:
            status = self.last or RunStatus(id=self.run_id, project=self.spec.project, status=CANCELLED,
                                            total=len(self.tasks_by_id), done=0, failed=0,
                                            model_version=self.spec.model_version)
            status = dataclasses.replace(status, status=CANCELLED)
        return status


def cancel_run(store: RunStore, run_id: str, connection=None) -> bool:
    """Cancel a run (``DELETE /jobs/<id>``): its queued jobs are cancelled, running chunks stop
    before their next write. True if the run was planning or running."""
    changed = store.cancel(run_id)
    if connection is not None:
        from backend import jobs

        jobs.cancel_run_jobs(connection, run_id)
    return changed


def run_prelabel(settings: Settings, project: int, prompt: str | None = None, chunk: int = 16, redo: bool = False,
                 progress: bool = True, store: RunStore | None = None, connection=None, *,
                 api: LabelStudioApi | None = None, pipeline=None, poll_s: float = POLL_S,
                 stall_s: float = STALL_S) -> RunStatus:
    """Pre-label ``project``; returns the final status (``done``, or ``cancelled`` after Ctrl-C).

    Embedded without ``settings.redis_url`` (and no ``connection``): chunks run here, on
    ``pipeline`` or a new :class:`~backend.pipeline.Pipeline`. Queue mode otherwise (see module doc).
    Raises :class:`PrelabelError` for a bad request and :class:`LabelStudioApiError` when LS
    refuses or cannot be reached while planning.
    """
    api, spec = _prepare(settings, project, prompt, redo, chunk, api)
    plan = plan_prelabel(api, spec.project, spec.model_version, spec.redo)
    log.info("project %s: %d tasks to label, %d skipped (they have a %r prediction)", project, len(plan.tasks),
             plan.skipped, spec.model_version)
    if connection is None and not settings.redis_url:
        return _embedded(settings, api, spec, plan, chunk, progress, store, pipeline)
    if connection is None:
        from backend import jobs

        connection = jobs.connect(settings.redis_url)
    store = store or RedisRunStore(connection)
    ids = [t["id"] for t in plan.tasks]
    run_id = _retry_redis(lambda: store.create(spec, ids, skipped=plan.skipped), "creating the run")
    supervisor = _Supervisor(connection, store, run_id, spec, plan.tasks, chunk, api, poll_s, stall_s)
    return supervisor.run(progress)


_memory_store: MemoryRunStore | None = None
_memory_store_lock = threading.Lock()


def get_store(settings: Settings, connection=None) -> RunStore:
    """The store ``GET /jobs/<id>`` reads: Redis in queue mode, else this process's memory store."""
    global _memory_store
    if connection is not None or settings.redis_url:
        if connection is None:
            from backend import jobs

            connection = jobs.connect(settings.redis_url)
        return RedisRunStore(connection)
    with _memory_store_lock:
        if _memory_store is None:
            _memory_store = MemoryRunStore()
        return _memory_store


def start_prelabel_in_background(settings: Settings, project: int, prompt: str | None = None, chunk: int = 16,
                                 redo: bool = False, *, store: RunStore | None = None, connection=None,
                                 api: LabelStudioApi | None = None, pipeline=None, poll_s: float = POLL_S,
                                 stall_s: float = STALL_S) -> str:
    """``POST /prelabel``: validate (project config, prompt: raises like :func:`run_prelabel`),
    create the run in status ``planning`` and return its id at once; a daemon thread lists the tasks
    and supervises the run (queue mode) or processes it (embedded, on ``pipeline``: pass the web
    app's). Follow it with ``get_store(settings).status(run_id)``."""
    api, spec = _prepare(settings, project, prompt, redo, chunk, api)
    queue_mode = connection is not None or bool(settings.redis_url)
    if queue_mode and connection is None:
        from backend import jobs

        connection = jobs.connect(settings.redis_url)
    store = store or get_store(settings, connection)
    run_id = store.create(spec, None)

    def main() -> None:
        try:
            plan = plan_prelabel(api, spec.project, spec.model_version, spec.redo)
            if store.state(run_id) != PLANNING:  # cancelled while planning
                return
            if not queue_mode:
                _embedded(settings, api, spec, plan, chunk, False, store, pipeline, run_id=run_id)
                return
            _retry_redis(lambda: store.set_tasks(run_id, [t["id"] for t in plan.tasks], skipped=plan.skipped),
                         f"run {run_id}")
            _Supervisor(connection, store, run_id, spec, plan.tasks, chunk, api, poll_s, stall_s).run(False)
        except Exception as exc:
            log.exception("run %s failed", run_id)
            try:
                store.finish(run_id, FAILED, error=str(exc) if isinstance(exc, (LabelStudioApiError, PrelabelError))
                             else f"{type(exc).__name__}: {exc}")
            except Exception:
                log.error("run %s: could not record its failure", run_id)

    threading.Thread(target=main, name=f"prelabel-{run_id}", daemon=True).start()
    return run_id


__all__ = ["CANCELLED", "DONE", "FAILED", "PLANNING", "RUNNING", "MemoryRunStore", "PrelabelError", "PrelabelPlan",
           "PrelabelSpec", "RedisRunStore", "RunStatus", "RunStore", "WriteLock", "WriteLockTimeout", "build_request",
           "cancel_run", "get_store", "plan_prelabel", "plan_tasks_to_label", "process_chunk", "run_prelabel",
           "start_prelabel_in_background", "write_prediction"]
