"""Run records in Redis (queue mode): :class:`RedisRunStore`, shared by the run's supervisor, the
workers and the web process, plus the run's supervision lease.

Keys (names in :mod:`backend.queue.keys`; ``<id>`` = run id)::

    gsam:run:<id>          hash: project, model_version, status, skipped, created, updated, error,
                           spec (JSON), chunk (tasks per job), scope (a run limited to some tasks:
                           their ids as ranges, "1-500,502"; "" for the whole project)
    gsam:run:<id>:tasks    set of the run's task ids
    gsam:run:<id>:done     set of task ids written back (or found already labeled)
    gsam:run:<id>:failed   hash task id -> reason
    gsam:run:<id>:jobs     set of the run's RQ job ids (written by :mod:`backend.bulk.chunkjob`)
    gsam:run:<id>:lease    the run's supervisor: its owner token (SET PX, :data:`LEASE_TTL_S`)
    gsam:run-index         sorted set run id -> when its record expires (pruned on read)

Counts (total, done, failed) are the sizes of the sets, never counters of their own. Every update
is one atomic command or Lua script, so concurrent workers never double-count. A planning or
running run's keys expire :data:`ACTIVE_TTL_S` (a day) after its supervisor last touched them
(:meth:`RedisRunStore.touch`, every minute while supervised), so a run nobody supervises any more
disappears by itself; finished and cancelled runs expire :data:`RUN_TTL_S` (a week) after they
end. The index key lives as long as its longest-lived member.

Imports :mod:`backend.queue.keys` and the bulk value modules; takes a ``redis.Redis`` but never
imports redis-py itself.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from backend.bulk.runstore import RunStore, new_run_id, scope_from_text, scope_to_text
from backend.bulk.spec import PrelabelSpec
from backend.bulk.status import FAILURES_SHOWN, RunState, RunStatus
from backend.bulk.writelock import LOCK_TTL_S, RedisWriteLocks
from backend.queue import keys

log = logging.getLogger(__name__)

RUN_TTL_S = 7 * 24 * 3600  # a finished run's record
ACTIVE_TTL_S = 24 * 3600  # a planning/running run's record, refreshed while it is supervised
#: A supervisor refreshes its run's lease every poll (0.5 s); a process of the deployment adopts a
#: run whose lease expired (its supervisor died: see :mod:`backend.bulk.adopt`).
LEASE_TTL_S = 20.0
_SADD_BATCH = 5000  # task ids per SADD: bounded command size for large projects
_ACTIVE = (RunState.PLANNING.value, RunState.RUNNING.value)

_MARK_DONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local added = redis.call('SADD', KEYS[2], ARGV[1])
if added == 1 then redis.call('HDEL', KEYS[3], ARGV[1]) end
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and redis.call('PTTL', KEYS[2]) == -1 then redis.call('PEXPIRE', KEYS[2], ttl) end
return added
"""

_MARK_FAILED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
local new = redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and redis.call('PTTL', KEYS[3]) == -1 then redis.call('PEXPIRE', KEYS[3], ttl) end
return new
"""

# ARGV: new status, now, error ('' = leave it), then the statuses it may change from.
_SET_STATUS_IF = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
local current = redis.call('HGET', KEYS[1], 'status')
for i = 4, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated', ARGV[2])
    return 1
  end
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRunStore(RunStore):
    """Run records in Redis (see the module docstring)."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self._mark_done = connection.register_script(_MARK_DONE)
        self._mark_failed = connection.register_script(_MARK_FAILED)
        self._set_status_if = connection.register_script(_SET_STATUS_IF)
        self._locks = RedisWriteLocks(connection)

    @staticmethod
    def _set_keys(run_id: str) -> tuple[str, str, str, str]:
        return (keys.run_key(run_id), keys.run_key(run_id, "done"), keys.run_key(run_id, "failed"),
                keys.run_key(run_id, "tasks"))

    # ------------------------------------------------------------------ writing

    def create(self, spec, task_ids, *, skipped=0, run_id=None, created=None, chunk=None, scope=None):
        run_id = run_id or new_run_id()
        meta_key, done_key, failed_key, tasks_key = self._set_keys(run_id)
        ids = None if task_ids is None else [int(t) for t in task_ids]
        scope_text = None if scope is None else scope_to_text(scope)
        if scope_text == "":
            raise ValueError("a run's scope names at least one task (None: the whole project)")
        now = time.time()
        state = RunState.PLANNING if ids is None else RunState.RUNNING
        meta = {"project": spec.project, "model_version": spec.model_version, "status": state.value,
                "skipped": skipped, "created": created or now, "updated": now, "error": "",
                "spec": json.dumps(spec.to_dict()), "chunk": int(chunk or 0),
                "scope": scope_text or ""}
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.delete(meta_key, done_key, failed_key, tasks_key)
            self._add_tasks(pipe, tasks_key, ids or [])
            pipe.hset(meta_key, mapping=meta)
            pipe.expire(meta_key, ACTIVE_TTL_S)
            pipe.expire(tasks_key, ACTIVE_TTL_S)
            self._index(pipe, run_id, ACTIVE_TTL_S)
            pipe.execute()
        return run_id

    @staticmethod
    def _add_tasks(pipe, tasks_key: str, ids: list[int]) -> None:
        for start in range(0, len(ids), _SADD_BATCH):
            pipe.sadd(tasks_key, *ids[start:start + _SADD_BATCH])

    @staticmethod
    def _index(pipe, run_id: str, ttl_s: int) -> None:
        """Record in the runs index that ``run_id`` lives ``ttl_s`` more seconds; the index itself
        lives as long as its longest-lived member (no member outlives a week from its last write)."""
        pipe.zadd(keys.RUN_INDEX, {run_id: time.time() + ttl_s})
        pipe.expire(keys.RUN_INDEX, RUN_TTL_S)  # >= every member's expiry: none is more than a week off

    def set_tasks(self, run_id, task_ids, *, skipped=0):
        meta_key, _, _, tasks_key = self._set_keys(run_id)
        now = time.time()
        with self.connection.pipeline(transaction=True) as pipe:
            self._add_tasks(pipe, tasks_key, [int(t) for t in task_ids])
            pipe.hset(meta_key, mapping={"skipped": skipped, "created": now, "updated": now})
            pipe.expire(tasks_key, ACTIVE_TTL_S)
            pipe.execute()
        self._set_status_if(keys=[meta_key], args=[RunState.RUNNING.value, now, "", RunState.PLANNING.value])

    def mark_done(self, run_id, task_id):
        meta_key, done_key, failed_key, _ = self._set_keys(run_id)
        result = self._mark_done(keys=[meta_key, done_key, failed_key], args=[int(task_id), time.time()])
        if result == -1:
            log.warning("run %s is unknown (expired or lost): task %s not recorded", run_id, task_id)
        return result == 1

    def mark_failed(self, run_id, task_id, reason):
        meta_key, done_key, failed_key, _ = self._set_keys(run_id)
        result = self._mark_failed(keys=[meta_key, done_key, failed_key],
                                   args=[int(task_id), str(reason)[:2000], time.time()])
        if result == -1:
            log.warning("run %s is unknown (expired or lost): task %s not recorded", run_id, task_id)
        return result == 1

    def cancel(self, run_id):
        changed = bool(self._set_status_if(keys=[keys.run_key(run_id)],
                                           args=[RunState.CANCELLED.value, time.time(), "", *_ACTIVE]))
        if changed:
            self._expire_later(run_id)
        return changed

    def finish(self, run_id, status=RunState.DONE, error=None):
        if self._set_status_if(keys=[keys.run_key(run_id)],
                               args=[RunState(status).value, time.time(), (error or "")[:2000], *_ACTIVE]):
            self._expire_later(run_id)

    def _expire_later(self, run_id: str) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            for key in (*self._set_keys(run_id), keys.jobs_key(run_id)):
                pipe.expire(key, RUN_TTL_S)
            pipe.delete(keys.lease_key(run_id))
            self._index(pipe, run_id, RUN_TTL_S)
            pipe.execute()

    def touch(self, run_id: str) -> None:
        """A supervisor's sign of life: keeps a planning or running run's record from expiring."""
        state = self.state(run_id)
        if state is None or not state.active:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for key in (*self._set_keys(run_id), keys.jobs_key(run_id)):
                pipe.expire(key, ACTIVE_TTL_S)
            self._index(pipe, run_id, ACTIVE_TTL_S)
            pipe.execute()

    # ------------------------------------------------------------------ the supervision lease

    def take_lease(self, run_id: str, owner: str, ttl: float = LEASE_TTL_S) -> bool:
        """Become (or stay) the run's supervisor: True when the lease was free or already ``owner``'s."""
        return self._locks.take(keys.lease_key(run_id), owner, ttl)

    def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up (only if ``owner`` holds it)."""
        self._locks.give_back(keys.lease_key(run_id), owner)

    def lease_holder(self, run_id: str) -> str | None:
        value = self.connection.get(keys.lease_key(run_id))
        return None if value is None else _text(value)

    def write_lock(self, project, task_id, model_version, ttl=LOCK_TTL_S, wait=None, owner=None):
        return self._locks.hold(project, task_id, model_version, ttl=ttl, wait=wait, owner=owner)

    # ------------------------------------------------------------------ reading

    def done_among(self, run_id, task_ids):
        if not task_ids:
            return set()
        flags = self.connection.smismember(keys.run_key(run_id, "done"), [int(t) for t in task_ids])
        return {int(t) for t, flag in zip(task_ids, flags) if flag}

    def state(self, run_id):
        value = self.connection.hget(keys.run_key(run_id), "status")
        return None if value is None else RunState(_text(value))

    def status(self, run_id):
        meta_key, done_key, failed_key, tasks_key = self._set_keys(run_id)
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.scard(tasks_key)
            pipe.scard(done_key)
            pipe.hlen(failed_key)
            raw, total, done, failed = pipe.execute()
        meta = {_text(k): _text(v) for k, v in raw.items()}
        if "status" not in meta:
            return None
        failures: dict[int, str] = {}
        if failed:
            for task_id, reason in self.connection.hscan_iter(failed_key, count=FAILURES_SHOWN):
                failures[int(_text(task_id))] = _text(reason)
                if len(failures) >= FAILURES_SHOWN:
                    break
        return RunStatus(id=run_id, project=int(meta.get("project", 0)), status=RunState(meta["status"]),
                         total=int(total), done=int(done), failed=int(failed),
                         model_version=meta.get("model_version", ""), skipped=int(meta.get("skipped") or 0),
                         created=float(meta.get("created") or 0), updated=float(meta.get("updated") or 0),
                         failures=dict(sorted(failures.items())), error=meta.get("error") or None)

    def spec(self, run_id: str) -> PrelabelSpec | None:
        raw = self.connection.hget(keys.run_key(run_id), "spec")
        return None if raw is None else PrelabelSpec.from_dict(json.loads(_text(raw)))

    def chunk(self, run_id: str) -> int | None:
        """Tasks per job the run was started with (None: unknown)."""
        raw = self.connection.hget(keys.run_key(run_id), "chunk")
        return int(_text(raw)) if raw is not None and int(_text(raw)) > 0 else None

    def scope(self, run_id):
        raw = self.connection.hget(keys.run_key(run_id), "scope")
        return scope_from_text(_text(raw)) if raw else None

    def pending(self, run_id):
        _, done_key, failed_key, tasks_key = self._set_keys(run_id)
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.sdiff(tasks_key, done_key)
            pipe.hkeys(failed_key)
            not_done, failed = pipe.execute()
        failed_ids = {int(_text(t)) for t in failed}
        return sorted(int(_text(t)) for t in not_done if int(_text(t)) not in failed_ids)

    def run_ids(self):
        self.connection.zremrangebyscore(keys.RUN_INDEX, "-inf", time.time())
        ids = [_text(i) for i in self.connection.zrange(keys.RUN_INDEX, 0, -1)]
        with self.connection.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.exists(keys.run_key(run_id))
            alive = pipe.execute()
        gone = [run_id for run_id, exists in zip(ids, alive) if not exists]
        if gone:
            self.connection.zrem(keys.RUN_INDEX, *gone)
        return sorted(run_id for run_id, exists in zip(ids, alive) if exists)

    def active_run_ids(self) -> list[str]:
        """Runs still planning or running (candidates for adoption when their lease expired)."""
        ids = self.run_ids()
        with self.connection.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hget(keys.run_key(run_id), "status")
            states = pipe.execute()
        return [run_id for run_id, state in zip(ids, states) if state is not None and _text(state) in _ACTIVE]


__all__ = ["ACTIVE_TTL_S", "LEASE_TTL_S", "RUN_TTL_S", "RedisRunStore"]
