"""Queue mode: the supervisor that drives one bulk run's RQ jobs from start to end.

A :class:`Supervisor` plans a run created ``planning`` (lists its tasks in LS), enqueues its
chunks as jobs on the ``prelabel`` queue (through a :class:`ChunkQueue`), then follows the run's
progress in Redis (:class:`~backend.bulk.redisstore.RedisRunStore`) until it ends: it survives
Redis restarts, re-enqueues lost work (in smaller jobs each round; after
:data:`MAX_REQUEUE_ROUNDS` rounds without progress the rest is recorded failed), re-creates a run
Redis lost, and cancels the run on Ctrl-C.

**Durable supervision.** A supervisor holds the run's lease (``gsam:run:<id>:lease``, SET PX
:data:`~backend.bulk.redisstore.LEASE_TTL_S`, refreshed every poll) and acts only while it holds
it; one that finds the lease taken by someone else only follows the progress. Everything it needs
lives in Redis or LS (spec, chunk size, task ids, done and failed sets and job ids in Redis; task
data in LS), so when its process dies, a worker adopts the run (:mod:`backend.bulk.adopt`): it
re-plans a run that died ``planning``, or enqueues at once the pending tasks no queued or running
job covers, then supervises the run to its end like its creator would have.

Imports the bulk planning and store modules and :mod:`backend.queue.connection`; never RQ (the
:class:`ChunkQueue` it is given does that) nor torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Protocol

from backend.batching import chunks
from backend.bulk.prelabel import plan_prelabel
from backend.bulk.redisstore import LEASE_TTL_S, RedisRunStore
from backend.bulk.request import PrelabelError
from backend.bulk.spec import BulkTask, PrelabelSpec
from backend.bulk.status import FINAL, RunState, RunStatus
from backend.bulk.progress import ProgressBar
from backend.ls.client import LabelStudioApi, LabelStudioApiError
from backend.queue.connection import backoff, transient_redis_errors

log = logging.getLogger(__name__)

POLL_S = 0.5
#: No progress for this long while no job of the run is queued, scheduled or running = stalled.
STALL_S = 15.0
#: Re-enqueue rounds in a row without any progress before the rest is given up as failed.
MAX_REQUEUE_ROUNDS = 3
#: How often a supervisor refreshes its run's record expiry (a day, see backend.bulk.redisstore).
TOUCH_EVERY_S = 60.0


class ChunkQueue(Protocol):
    """Where a run's chunks go and who works on them (default: RQ,
    :class:`backend.bulk.chunkjob.RqChunkQueue`; tests inject a fake)."""

    def enqueue(self, run_id: str, spec: PrelabelSpec, tasks: Sequence[BulkTask]) -> str:
        """Queue one chunk of the run; returns its job id."""
        ...

    def in_flight(self, run_id: str) -> int:
        """The run's jobs that are queued, waiting for a retry, or running on a live worker."""
        ...

    def tasks_in_flight(self, run_id: str) -> set[int]:
        """Task ids of those jobs."""
        ...

    def cancel(self, run_id: str) -> int:
        """Cancel the run's jobs that have not started; how many."""
        ...

    def live_workers(self) -> int:
        ...

    def live_model_versions(self, engine: str | None = None) -> dict[str, list[str]]:
        """Model version -> names of the live workers that serve it (of ``engine`` only, when given)."""
        ...

    def live_engines(self) -> dict[str, dict[str, list[str]]]:
        """Engine -> model version -> names of the live workers serving it."""
        ...


def cancel_run(store: RedisRunStore, chunks_queue: ChunkQueue, run_id: str) -> bool:
    """Cancel a run: its queued jobs are cancelled, running chunks stop before their next write.
    True if the run was planning or running."""
    changed = store.cancel(run_id)
    chunks_queue.cancel(run_id)
    return changed


class Supervisor:
    """Plans (a run created ``planning``), enqueues the chunks, then follows the run in Redis until
    it ends, holding the run's lease (see the module docstring).

    ``tasks`` are what the creator planned; a supervisor that adopts a run passes None and gets the
    data of the tasks it must (re-)enqueue from LS. Without the lease (another process supervises)
    it only follows the run's progress.
    """

    def __init__(self, store: RedisRunStore, chunks_queue: ChunkQueue, run_id: str, spec: PrelabelSpec,
                 tasks: list[BulkTask] | None, chunk: int, api: LabelStudioApi, *, poll_s: float = POLL_S,
                 stall_s: float = STALL_S, owner: str | None = None, adopted: bool = False):
        self.store = store
        self.chunks = chunks_queue
        self.run_id = run_id
        self.spec = spec
        self.tasks_by_id = {t.id: t for t in tasks or ()}
        self.all_tasks_known = tasks is not None  # enough to re-create the run if Redis loses it
        self.chunk = chunk
        self.api = api
        self.poll_s = poll_s
        self.stall_s = stall_s
        self.owner = owner or uuid.uuid4().hex
        self.outbox: list[Sequence[BulkTask]] = list(chunks(tasks or [], chunk))  # chunks still to enqueue
        self.must_adopt = adopted  # on taking the lease: find the work that was lost with the old supervisor
        self.has_lease = False
        self.last_touch = float("-inf")
        self.requeue_rounds = 0
        self.last: RunStatus | None = None
        self.last_change = time.monotonic()

    # ------------------------------------------------------------------ the lease

    @contextlib.contextmanager
    def _keeping_lease(self) -> Iterator[None]:
        """Refresh the lease from a thread while a long LS listing runs (planning, adoption)."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(LEASE_TTL_S / 4):
                try:
                    self.store.take_lease(self.run_id, self.owner)
                except Exception as exc:  # noqa: BLE001 - the main loop notices a lost lease at its next step
                    log.warning("run %s: could not refresh its lease (%s)", self.run_id, type(exc).__name__)

        thread = threading.Thread(target=keep, name=f"lease-{self.run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _release(self) -> None:
        try:
            self.store.release_lease(self.run_id, self.owner)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("run %s: could not release its lease (%s)", self.run_id, type(exc).__name__)

    # ------------------------------------------------------------------ task data

    def _task_data(self, ids: list[int]) -> list[BulkTask]:
        """The tasks ``ids`` (ascending): from the plan, else listed from LS. A task LS no longer
        has is recorded failed."""
        missing = {i for i in ids if i not in self.tasks_by_id}
        if missing:
            with self._keeping_lease():
                for ref in self.api.iter_tasks(self.spec.project):
                    if ref.id in missing:
                        self.tasks_by_id[ref.id] = BulkTask(id=ref.id, data=ref.data)
                        missing.discard(ref.id)
            self.store.fail_all(self.run_id, sorted(missing), "not processed: the task is no longer in the project")
        return [self.tasks_by_id[i] for i in sorted(ids) if i in self.tasks_by_id]

    # ------------------------------------------------------------------ planning, adoption, recovery

    def _plan(self) -> None:
        """The run is ``planning`` and ours: list its tasks in LS (again, after an adoption), only
        those of its scope when it has one (a subset run: the scope is in Redis, so an adopter
        plans the same subset)."""
        try:
            with self._keeping_lease():
                plan = plan_prelabel(self.api, self.spec.project, self.spec.model_version, self.spec.redo,
                                     task_ids=self.store.scope(self.run_id))
        except (LabelStudioApiError, PrelabelError) as exc:
            log.error("run %s: planning failed: %s", self.run_id, exc)
            self.store.finish(self.run_id, RunState.FAILED, error=str(exc))
            return
        if self.store.state(self.run_id) != RunState.PLANNING:  # cancelled while planning
            return
        log.info("run %s: project %s: %d tasks to label, %d skipped (they have a %r prediction)", self.run_id,
                 self.spec.project, len(plan.tasks), plan.skipped, self.spec.model_version)
        self.store.set_tasks(self.run_id, [t.id for t in plan.tasks], skipped=plan.skipped)
        self.tasks_by_id = {t.id: t for t in plan.tasks}
        self.all_tasks_known = True
        self.outbox = list(chunks(plan.tasks, self.chunk))
        self.must_adopt = False  # planned here: nothing was enqueued before
        self.last_change = time.monotonic()

    def _adopt(self) -> None:
        """The run's previous supervisor is gone: enqueue at once its pending tasks that no queued or
        running job covers (chunks it never enqueued, jobs that were lost with it)."""
        pending = self.store.pending(self.run_id)
        covered = self.chunks.tasks_in_flight(self.run_id)
        todo = [i for i in pending if i not in covered]
        log.warning("run %s: supervising it (its supervisor is gone): %d tasks pending, %d in queued or running "
                    "jobs, enqueueing %d", self.run_id, len(pending), len(pending) - len(todo), len(todo))
        self.outbox = list(chunks(self._task_data(todo), self.chunk))
        self.last_change = time.monotonic()

    def _enqueue_outbox(self) -> None:
        while self.outbox:
            self.chunks.enqueue(self.run_id, self.spec, self.outbox[0])
            self.outbox.pop(0)

    def _recreate(self) -> None:
        """The run vanished from Redis (restarted without persistence, flushed): create it again
        under its id. Without redo, tasks LS already holds a prediction of this version for are
        recorded done at once instead of being labeled again."""
        log.warning("run %s vanished from Redis: re-creating it and re-enqueueing its tasks", self.run_id)
        ids = sorted(self.tasks_by_id)
        self.store.create(self.spec, ids, skipped=self.last.skipped if self.last else 0, run_id=self.run_id,
                          created=self.last.created if self.last else None, chunk=self.chunk)
        todo = set(ids)
        if not self.spec.redo:
            try:
                for ref in self.api.iter_tasks(self.spec.project):
                    if ref.id in todo and ref.has_version(self.spec.model_version):
                        self.store.mark_done(self.run_id, ref.id)
                        todo.discard(ref.id)
            except LabelStudioApiError as exc:
                log.warning("run %s: could not check LS for tasks labeled meanwhile: %s", self.run_id, exc)
        self.outbox = list(chunks([self.tasks_by_id[i] for i in sorted(todo)], self.chunk))

    def _requeue_pending(self) -> None:
        pending = self.store.pending(self.run_id)
        self.requeue_rounds += 1
        size = max(1, self.chunk >> (self.requeue_rounds - 1))  # smaller chunks isolate a task that crashes
        log.warning("run %s stalled with %d tasks pending and no job in flight: re-enqueueing them "
                    "(round %d, %d per job)", self.run_id, len(pending), self.requeue_rounds, size)
        self.outbox.extend(chunks(self._task_data(pending), size))

    def _give_up(self) -> None:
        pending = self.store.pending(self.run_id)
        reason = (f"not processed: {MAX_REQUEUE_ROUNDS} re-enqueues in a row made no progress "
                  "(check the workers' logs; is `python -m backend worker` running?)")
        log.error("run %s: giving up on %d tasks: %s", self.run_id, len(pending), reason)
        self.store.fail_all(self.run_id, pending, reason)

    # ------------------------------------------------------------------ one round

    def _vanished(self) -> RunStatus:
        """The final status of an adopted run whose record expired or was flushed."""
        log.warning("run %s vanished from Redis: no longer supervising it", self.run_id)
        error = "the run's record vanished"
        if self.last is not None:
            return dataclasses.replace(self.last, status=RunState.FAILED, error=error)
        return RunStatus(id=self.run_id, project=self.spec.project, status=RunState.FAILED, total=0, done=0,
                         failed=0, model_version=self.spec.model_version, error=error)

    def step(self) -> RunStatus | None:
        """One supervision round; the final status when the run has ended, else None."""
        status = self.store.status(self.run_id)
        if status is None:
            if not self.all_tasks_known:  # an adopted run that expired or was flushed: nothing left to do
                return self._vanished()
            self._recreate()
            self.store.take_lease(self.run_id, self.owner)
            self._enqueue_outbox()
            self.last_change = time.monotonic()
            return None
        if status.status in FINAL:
            return status
        if not self.store.take_lease(self.run_id, self.owner):
            if self.has_lease:
                log.warning("run %s: another process took over its supervision; following it only", self.run_id)
            self.has_lease, self.must_adopt = False, True
            self.last, self.last_change = status, time.monotonic()
            return None
        self.has_lease = True
        if time.monotonic() - self.last_touch > TOUCH_EVERY_S:
            self.store.touch(self.run_id)
            self.last_touch = time.monotonic()
        if status.status == RunState.PLANNING:
            self._plan()
            return None
        if self.must_adopt:
            self.must_adopt = False
            self._adopt()
        self._enqueue_outbox()
        processed = status.done + status.failed
        if self.last is None or processed != self.last.done + self.last.failed:
            self.last_change = time.monotonic()
            if self.last is not None:
                self.requeue_rounds = 0
        self.last = status
        if status.status == RunState.RUNNING and processed >= status.total:
            self.store.finish(self.run_id)
            return self.store.status(self.run_id)
        if time.monotonic() - self.last_change > self.stall_s and self.chunks.in_flight(self.run_id) == 0:
            if self.requeue_rounds >= MAX_REQUEUE_ROUNDS:
                self._give_up()
            else:
                self._requeue_pending()
            self.last_change = time.monotonic()
        return None

    def run(self, progress: bool) -> RunStatus:
        """Supervise until the run ends (or Ctrl-C cancels it); the final status."""
        transient = transient_redis_errors()
        bar = ProgressBar(progress, len(self.tasks_by_id), self.spec.project)
        self.last_change = time.monotonic()
        pauses = backoff(0.5, 10.0)
        note = None
        try:
            while True:
                try:
                    final = self.step()
                    if final is not None:
                        bar.show(final)
                        return final
                    note = self._note()
                    pauses = backoff(0.5, 10.0)
                except transient as exc:
                    note = f"Redis unreachable ({type(exc).__name__}), reconnecting"
                    pause = next(pauses)
                    log.warning("run %s: %s in %.1f s", self.run_id, note, pause)
                    bar.show(self.last, note)
                    time.sleep(pause)
                    self.last_change = time.monotonic()  # an outage is not a stall: workers reconnect too
                    continue
                bar.show(self.last, note)
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            return self._cancel()
        finally:
            self._release()
            bar.close()

    def _note(self) -> str | None:
        if not self.has_lease:
            return "supervised by another process"
        try:
            return None if self.chunks.live_workers() else "no live worker"
        except Exception:  # noqa: BLE001 - only a hint on the bar
            return None

    def _cancel(self) -> RunStatus:
        log.warning("run %s: cancelling", self.run_id)
        try:
            cancel_run(self.store, self.chunks, self.run_id)
            status = self.store.status(self.run_id)
        except Exception as exc:  # noqa: BLE001 - report the cancel as far as it went
            log.error("run %s: could not cancel it in Redis (%s)", self.run_id, type(exc).__name__)
            status = None
        if status is None:
            status = self.last or RunStatus(id=self.run_id, project=self.spec.project, status=RunState.CANCELLED,
                                            total=len(self.tasks_by_id), done=0, failed=0,
                                            model_version=self.spec.model_version)
            status = dataclasses.replace(status, status=RunState.CANCELLED)
        return status


__all__ = ["ChunkQueue", "MAX_REQUEUE_ROUNDS", "POLL_S", "STALL_S", "Supervisor", "cancel_run"]
