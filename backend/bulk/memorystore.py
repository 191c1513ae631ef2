"""Run records in this process (embedded mode): :class:`MemoryRunStore`.

A run lives as long as the process; nothing expires. Thread-safe (the web app's background runs
and ``GET /jobs/<id>`` share one store). Imports only the bulk value modules and the interface.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from backend.bulk.runstore import RunStore, new_run_id
from backend.bulk.spec import PrelabelSpec
from backend.bulk.status import FAILURES_SHOWN, RunState, RunStatus
from backend.bulk.writelock import LOCK_TTL_S, MemoryWriteLocks


@dataclass
class _MemoryRun:
    spec: PrelabelSpec
    state: RunState
    tasks: set[int]
    skipped: int
    created: float
    updated: float
    done: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    error: str | None = None
    scope: tuple[int, ...] | None = None


class MemoryRunStore(RunStore):
    """Run records in a dict under one lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._runs: dict[str, _MemoryRun] = {}
        self._write_locks = MemoryWriteLocks()

    def create(self, spec, task_ids, *, skipped=0, run_id=None, created=None, chunk=None, scope=None):
        run_id = run_id or new_run_id()
        now = time.time()
        with self._lock:
            state = RunState.PLANNING if task_ids is None else RunState.RUNNING
            self._runs[run_id] = _MemoryRun(spec=spec, state=state, tasks={int(t) for t in task_ids or ()},
                                            skipped=skipped, created=created or now, updated=now,
                                            scope=None if scope is None else tuple(sorted({int(t) for t in scope})))
        return run_id

    def scope(self, run_id):
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else run.scope

    def set_tasks(self, run_id, task_ids, *, skipped=0):
        with self._lock:
            run = self._runs[run_id]
            run.tasks = {int(t) for t in task_ids}
            run.skipped = skipped
            run.created = run.updated = time.time()
            if run.state == RunState.PLANNING:
                run.state = RunState.RUNNING

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
            return None if run is None else run.state

    def cancel(self, run_id):
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or not run.state.active:
                return False
            run.state, run.updated = RunState.CANCELLED, time.time()
            return True

    def finish(self, run_id, status=RunState.DONE, error=None):
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None and run.state.active:
                run.state, run.error, run.updated = status, error, time.time()

    def status(self, run_id):
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            failures = dict(sorted(run.failed.items())[:FAILURES_SHOWN])
            return RunStatus(id=run_id, project=run.spec.project, status=run.state, total=len(run.tasks),
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

    def write_lock(self, project, task_id, model_version, ttl=LOCK_TTL_S, wait=None, owner=None):
        return self._write_locks.hold(project, task_id, model_version, ttl=ttl, wait=wait, owner=owner)


__all__ = ["MemoryRunStore"]
