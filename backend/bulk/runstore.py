"""Run records of bulk pre-label runs: the :class:`RunStore` interface both stores implement.

A run store keeps, per run: its spec, its state (:class:`~backend.bulk.status.RunState`), the ids
of the tasks it covers, which are done (written back, or found already labeled) and which failed
(with a reason), and hands out the per-task write lock (:mod:`backend.bulk.writelock`). A task is
counted once however often it is re-processed; a done task stays done.

Implementations: :class:`~backend.bulk.memorystore.MemoryRunStore` (embedded mode, one process)
and :class:`~backend.bulk.redisstore.RedisRunStore` (queue mode, shared through Redis; it also
holds the supervision lease, see :mod:`backend.bulk.supervisor`).

Imports only the bulk value modules (spec, status, writelock).
"""

from __future__ import annotations

import abc
import contextlib
import uuid
from collections.abc import Iterable

from backend.bulk.spec import PrelabelSpec
from backend.bulk.status import RunState, RunStatus
from backend.bulk.writelock import LOCK_TTL_S, WriteLock


def new_run_id() -> str:
    """16 lowercase hex characters (what ``/jobs/<id>`` accepts)."""
    return uuid.uuid4().hex[:16]


def scope_to_text(task_ids: Iterable[int]) -> str:
    """A run's scope as compact text: ascending ranges, ``"1-500,502,504-510"`` (a Data Manager
    selection is mostly ranges, so 100,000 ids usually take a few characters)."""
    parts: list[str] = []
    ids = sorted({int(t) for t in task_ids})
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            first, last = ids[start], ids[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


def scope_from_text(text: str) -> tuple[int, ...]:
    """The ids of :func:`scope_to_text`'s text (ascending); ValueError for anything else."""
    ids: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return tuple(ids)


class RunStore(abc.ABC):
    """Where runs are recorded (see the module docstring for the semantics)."""

    @abc.abstractmethod
    def create(self, spec: PrelabelSpec, task_ids: Iterable[int] | None, *, skipped: int = 0,
               run_id: str | None = None, created: float | None = None, chunk: int | None = None,
               scope: Iterable[int] | None = None) -> str:
        """A new run over ``task_ids`` (state ``running``), or ``planning`` when ``task_ids`` is None
        (then :meth:`set_tasks` follows). ``run_id`` (and ``created``) re-create a run under its old id.
        ``chunk`` (tasks per job) is kept for a supervisor that adopts the run; so is ``scope``, the
        task ids a run limited to a subset plans from (None: the whole project), see :meth:`scope`."""

    @abc.abstractmethod
    def scope(self, run_id: str) -> tuple[int, ...] | None:
        """The task ids the run was limited to (ascending), None for a whole-project run (or an
        unknown one): whoever plans the run, its creator or a process that adopted it, plans these."""

    @abc.abstractmethod
    def set_tasks(self, run_id: str, task_ids: Iterable[int], *, skipped: int = 0) -> None:
        """The planned tasks of a ``planning`` run; it becomes ``running``."""

    @abc.abstractmethod
    def mark_done(self, run_id: str, task_id: int) -> bool:
        """Record the task as done (moving it out of failed); False if it already was."""

    @abc.abstractmethod
    def mark_failed(self, run_id: str, task_id: int, reason: str) -> bool:
        """Record the task as failed with ``reason``; ignored (False) for a task already done."""

    def fail_all(self, run_id: str, task_ids: Iterable[int], reason: str) -> int:
        """Record every task of ``task_ids`` failed with one ``reason`` (tasks already done stay
        done); how many were newly failed."""
        return sum(self.mark_failed(run_id, task_id, reason) for task_id in task_ids)

    def is_done(self, run_id: str, task_id: int) -> bool:
        return task_id in self.done_among(run_id, [task_id])

    @abc.abstractmethod
    def done_among(self, run_id: str, task_ids: list[int]) -> set[int]:
        """Those of ``task_ids`` the run recorded done."""

    @abc.abstractmethod
    def state(self, run_id: str) -> RunState | None:
        """The run's state, or None for an unknown (expired, lost) run."""

    def is_cancelled(self, run_id: str) -> bool:
        return self.state(run_id) == RunState.CANCELLED

    @abc.abstractmethod
    def cancel(self, run_id: str) -> bool:
        """Cancel a planning or running run; True if it was one."""

    @abc.abstractmethod
    def finish(self, run_id: str, status: RunState = RunState.DONE, error: str | None = None) -> None:
        """Mark a planning/running run ``done`` (or ``failed`` with ``error``)."""

    @abc.abstractmethod
    def status(self, run_id: str) -> RunStatus | None:
        """The run's progress, or None for an unknown run."""

    @abc.abstractmethod
    def pending(self, run_id: str) -> list[int]:
        """Task ids of the run that are neither done nor failed, ascending."""

    @abc.abstractmethod
    def run_ids(self) -> list[str]:
        """Every run the store still keeps."""

    @abc.abstractmethod
    def write_lock(self, project: int, task_id: int, model_version: str, ttl: float = LOCK_TTL_S,
                   wait: float | None = None,
                   owner: str | None = None) -> contextlib.AbstractContextManager[WriteLock]:
        """Exclusive right to write ``task_id``'s prediction of ``model_version`` (``wait`` seconds,
        default ``ttl``, then :class:`~backend.bulk.writelock.WriteLockTimeout`). A lock left behind
        by the same ``owner`` (a retry after Redis went away mid-write) is taken over instead of
        waited out."""


__all__ = ["RunStore", "new_run_id", "scope_from_text", "scope_to_text"]
