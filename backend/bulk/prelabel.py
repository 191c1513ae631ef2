"""Bulk pre-labeling of a whole Label Studio project: what a run does to the tasks.

A *run* labels the tasks of one project with one model version:

1. **plan** (:func:`plan_prelabel`): list the project's tasks with the model versions of their
   predictions (one cheap paginated Data Manager query, see :mod:`backend.ls.client`) and keep those
   without a prediction of the current ``model_version`` (all of them with ``redo``);
2. **process** (:func:`process_chunk`, what a ``prelabel`` RQ job runs), chunk by chunk and, within
   a chunk, one engine batch at a time: run the pipeline on the batch, then write each task's
   prediction back to LS (:func:`write_prediction`) before the next batch (so a chunk cut short,
   e.g. by its job timeout, keeps what it finished) and record the task as done, or as failed with
   its reason when its image could not be used (a *poison* task fails alone; it gets no prediction,
   so a later run retries it);
3. **drive** (:mod:`backend.bulk.runs`): run the chunks in this process or as RQ jobs
   (:mod:`backend.bulk.chunkjob`, followed by :mod:`backend.bulk.supervisor`) to the run's end.

Run records (status, done and failed tasks, write locks) live in a
:class:`~backend.bulk.runstore.RunStore`. A task's failure is a value (:class:`Failed`), recorded
with its reason; the write's outcome is a :class:`WriteOutcome`.

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

Imports the bulk value and store modules, :mod:`backend.ls` and :mod:`backend.queue.connection`;
never torch (:func:`process_chunk` runs on the pipeline it is given) nor redis-py.
"""

from __future__ import annotations

import enum
import itertools
import logging
import uuid
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from backend.bulk.runstore import RunStore
from backend.bulk.spec import BulkTask, PrelabelSpec
from backend.bulk.status import RunState
from backend.bulk.writelock import WriteLock, WriteLockTimeout
from backend.ls.client import LabelStudioApi, LabelStudioApiError, LabelStudioUnavailable
from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.tasks import PredictRequest, RequestError
from backend.queue.connection import retry_redis

if TYPE_CHECKING:  # a type name only: chunks run on whatever pipeline they are given
    from backend.pipeline.predict import TaskOutcome

log = logging.getLogger(__name__)


class WriteOutcome(enum.StrEnum):
    """What :func:`write_prediction` did: ``created``, ``replaced`` (redo), ``kept`` (LS already had
    one of this version) or ``already`` (this run recorded the task done, e.g. a racing copy)."""

    CREATED = "created"
    REPLACED = "replaced"
    KEPT = "kept"
    ALREADY = "already"


class ChunkPipeline(Protocol):
    """What :func:`process_chunk` needs of a :class:`backend.pipeline.predict.Pipeline`."""

    model_version: str

    def batch_size(self) -> int: ...

    def predict_outcomes(self, request: PredictRequest) -> list[TaskOutcome]: ...


@dataclass(frozen=True)
class Failed:
    """A task that gets no prediction in this run, and why (recorded in the run's failures)."""

    reason: str


# ================================================================================== planning

@dataclass
class PrelabelPlan:
    tasks: list[BulkTask]  # the tasks to label, ascending id
    skipped: int  # tasks left out because they already have a prediction of the model version


def plan_prelabel(api: LabelStudioApi, project: int, model_version: str, redo: bool,
                  page_size: int = 100, task_ids: Collection[int] | None = None) -> PrelabelPlan:
    """The project's tasks without a prediction of ``model_version`` (all of them with ``redo``);
    with ``task_ids`` only those of them (ids LS no longer has are left out). A subset is listed
    from its smallest id to its largest (keyset pages): a Data Manager selection is usually a
    range, so that is a fraction of the project."""
    tasks, skipped = [], 0
    wanted = None if task_ids is None else frozenset(task_ids)
    if wanted is None:
        refs = api.iter_tasks(project, page_size=page_size)
    elif not wanted:
        return PrelabelPlan(tasks=[], skipped=0)
    else:
        last = max(wanted)
        refs = itertools.takewhile(lambda ref: ref.id <= last,
                                   api.iter_tasks(project, page_size=page_size, after=min(wanted) - 1))
    for ref in refs:
        if wanted is not None and ref.id not in wanted:
            continue
        if not redo:
            has = ref.has_version(model_version)
            if has is None:  # the DM string was ambiguous for this version: ask exactly
                has = model_version in api.prediction_versions(ref.id)
            if has:
                skipped += 1
                continue
        tasks.append(BulkTask(id=ref.id, data=ref.data))
    return PrelabelPlan(tasks=tasks, skipped=skipped)


def plan_tasks_to_label(api: LabelStudioApi, project: int, model_version: str, redo: bool) -> list[BulkTask]:
    """The tasks a run labels: those without a prediction of ``model_version``, or all."""
    return plan_prelabel(api, project, model_version, redo).tasks


# ================================================================================== processing

def build_request(spec: PrelabelSpec, tasks: Sequence[BulkTask]) -> PredictRequest:
    """The pipeline request for a chunk: the run's prompt (or none, so the labels are the prompt)
    and the project's options."""
    return PredictRequest(tasks=[{"id": t.id, "data": t.data} for t in tasks],
                          config=parse_label_config(spec.label_config), context=None, prompt=spec.prompt,
                          options=spec.options, bulk=True)


def write_prediction(api: LabelStudioApi, store: RunStore, run_id: str, spec: PrelabelSpec, task_id: int,
                     prediction: dict, owner: str | None = None) -> WriteOutcome:
    """Write one task's prediction idempotently and record it as done; says what happened.

    Raises :class:`LabelStudioApiError` (the task's own problem, e.g. deleted meanwhile),
    :class:`LabelStudioUnavailable` (worth retrying the chunk) or :class:`WriteLockTimeout`.
    """
    with store.write_lock(spec.project, task_id, spec.model_version, owner=owner) as lock:
        if store.is_done(run_id, task_id):
            return WriteOutcome.ALREADY
        existing = [pid for pid, version in api.predictions(task_id) if version == spec.model_version]
        if existing and not spec.redo:
            store.mark_done(run_id, task_id)
            return WriteOutcome.KEPT
        lock.refresh()
        _create_checked(api, task_id, {**prediction, "model_version": spec.model_version}, existing, lock)
        for prediction_id in existing:
            lock.refresh()
            api.delete_prediction(prediction_id)
        store.mark_done(run_id, task_id)
        return WriteOutcome.REPLACED if existing else WriteOutcome.CREATED


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


def fail_tasks(store: RunStore, run_id: str, tasks: Sequence[BulkTask], reason: str) -> None:
    """Record every task of a chunk (or batch) failed with one reason; tasks already done stay done."""
    retry_redis(lambda: store.fail_all(run_id, [t.id for t in tasks], reason), f"run {run_id}")


def process_chunk(pipeline: ChunkPipeline, api: LabelStudioApi, store: RunStore, run_id: str, spec: PrelabelSpec,
                  tasks: Sequence[BulkTask]) -> None:
    """Label one chunk and write its predictions back (what a ``prelabel`` RQ job does).

    Skips the chunk when the run is not running (cancelled, finished, unknown) and the tasks this
    run already recorded done. A task whose image fails is recorded failed with the reason and gets
    no prediction. Raises (so RQ retries the chunk; done tasks are then skipped) when LS is
    unreachable or the pipeline itself fails.
    """
    state = retry_redis(lambda: store.state(run_id), f"run {run_id}")
    if state != RunState.RUNNING:
        log.info("run %s is %s: skipping a chunk of %d tasks", run_id, state or "unknown", len(tasks))
        return
    done = retry_redis(lambda: store.done_among(run_id, [t.id for t in tasks]), f"run {run_id}")
    todo = [t for t in tasks if t.id not in done]
    if not todo:
        return
    if pipeline.model_version != spec.model_version:
        fail_tasks(store, run_id, todo,
                   f"this worker serves model_version {pipeline.model_version!r} but the run labels with "
                   f"{spec.model_version!r}: give workers and the prelabel command the same model settings")
        return
    counts: Counter[str] = Counter()
    owner = uuid.uuid4().hex  # this attempt's locks: its own retries may take them over
    size = pipeline.batch_size()
    for start in range(0, len(todo), size):
        batch = todo[start:start + size]
        if start and retry_redis(lambda: store.state(run_id), f"run {run_id}") != RunState.RUNNING:
            log.info("run %s is no longer running: not labeling the rest of its chunk", run_id)
            return
        if not _label_batch(pipeline, api, store, run_id, spec, batch, owner, counts):
            return
    log.info("run %s: chunk of %d tasks: %s", run_id, len(todo),
             ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing to do")


def _label_batch(pipeline: ChunkPipeline, api: LabelStudioApi, store: RunStore, run_id: str, spec: PrelabelSpec,
                 batch: list[BulkTask], owner: str, counts: Counter[str]) -> bool:
    """Run the pipeline on one sub-batch and write its predictions back; False when the run was
    cancelled meanwhile (the chunk stops). Raises like :func:`process_chunk`."""
    try:
        outcomes = pipeline.predict_outcomes(build_request(spec, batch))
    except (RequestError, LabelConfigError) as exc:  # the same for every task: no retry helps
        fail_tasks(store, run_id, batch, str(exc))
        counts["failed"] += len(batch)
        return True
    for task, outcome in zip(batch, outcomes):
        if retry_redis(lambda: store.is_cancelled(run_id), f"run {run_id}"):
            log.info("run %s cancelled: not writing the rest of its chunk", run_id)
            return False
        result = Failed(outcome.error) if outcome.error else \
            _write_task(api, store, run_id, spec, task.id, outcome.prediction, owner)
        if isinstance(result, Failed):
            retry_redis(lambda: store.mark_failed(run_id, task.id, result.reason), f"run {run_id}")
            counts["failed"] += 1
        else:
            counts[result.value] += 1
    return True


def _write_task(api: LabelStudioApi, store: RunStore, run_id: str, spec: PrelabelSpec, task_id: int,
                prediction: dict, owner: str) -> WriteOutcome | Failed:
    """:func:`write_prediction`, with the task's own write-back problems as a :class:`Failed`;
    LS being unreachable still raises (the whole chunk is worth retrying)."""
    try:
        return retry_redis(lambda: write_prediction(api, store, run_id, spec, task_id, prediction, owner),
                           f"run {run_id}")
    except LabelStudioUnavailable:
        raise
    except (LabelStudioApiError, WriteLockTimeout) as exc:
        return Failed(f"write-back failed: {exc}")


__all__ = ["ChunkPipeline", "Failed", "PrelabelPlan", "WriteOutcome", "build_request", "fail_tasks", "plan_prelabel",
           "plan_tasks_to_label", "process_chunk", "write_prediction"]
