"""Driving a bulk pre-label run (:mod:`backend.prelabel`) from start to end.

Entry points: :func:`run_prelabel` (``python -m backend prelabel``: blocks, with a tqdm bar),
:func:`start_prelabel_in_background` (``POST /prelabel``: returns the run id at once) and
:func:`cancel_run` (``DELETE /jobs/<id>``).

Embedded (no ``REDIS_URL``) the chunks run in this process, one after the other. In queue mode they
are RQ jobs on the ``prelabel`` queue (:mod:`backend.jobs`) and this process follows the run's
progress in Redis (:class:`~backend.runstore.RedisRunStore`), shows it as a tqdm bar, survives
Redis restarts, re-enqueues lost work (in smaller jobs each round; after ``MAX_REQUEUE_ROUNDS``
rounds without progress the rest is recorded failed), and cancels the run on Ctrl-C.

This module never imports torch: the pipeline (and through it the models) is created only for
embedded runs, and only when a chunk is processed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator

from backend.labelconfig import LabelConfigError, parse_label_config
from backend.lsclient import LabelStudioApi, LabelStudioApiError
from backend.pipeline import model_version as settings_model_version, prompt_limits
from backend.prelabel import PrelabelError, PrelabelPlan, PrelabelSpec, plan_prelabel, process_chunk
from backend.runstore import (CANCELLED, FAILED, FINAL, PLANNING, RUNNING, MemoryRunStore, RedisRunStore, RunStatus,
                              RunStore, retry_redis, transient_redis_errors)
from backend.settings import Settings
from backend.tasks import RequestError, split_prompt

log = logging.getLogger(__name__)

POLL_S = 0.5
#: No progress for this long while no job of the run is queued, scheduled or running = stalled.
STALL_S = 15.0
#: Re-enqueue rounds in a row without any progress before the rest is given up as failed.
MAX_REQUEUE_ROUNDS = 3


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
                for task in tasks:  # mark_failed leaves a task that is already done alone
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
        transient = transient_redis_errors()
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
    run_id = retry_redis(lambda: store.create(spec, ids, skipped=plan.skipped), "creating the run")
    supervisor = _Supervisor(connection, store, run_id, spec, plan.tasks, chunk, api, poll_s, stall_s)
    return supervisor.run(progress)


def start_prelabel_in_background(settings: Settings, project: int, prompt: str | None = None, chunk: int = 16,
                                 redo: bool = False, *, store: RunStore, connection=None,
                                 api: LabelStudioApi | None = None, pipeline=None, poll_s: float = POLL_S,
                                 stall_s: float = STALL_S) -> str:
    """``POST /prelabel``: validate (project config, prompt: raises like :func:`run_prelabel`),
    create the run in status ``planning`` and return its id at once; a daemon thread lists the tasks
    and supervises the run (queue mode) or processes it (embedded, on ``pipeline``: pass the web
    app's). Follow it with ``store.status(run_id)``: pass a store the caller keeps (the web app's),
    a :class:`~backend.runstore.RedisRunStore` on ``connection`` in queue mode."""
    api, spec = _prepare(settings, project, prompt, redo, chunk, api)
    queue_mode = connection is not None or bool(settings.redis_url)
    if queue_mode and connection is None:
        from backend import jobs

        connection = jobs.connect(settings.redis_url)
    run_id = store.create(spec, None)

    def main() -> None:
        try:
            plan = plan_prelabel(api, spec.project, spec.model_version, spec.redo)
            if store.state(run_id) != PLANNING:  # cancelled while planning
                return
            if not queue_mode:
                _embedded(settings, api, spec, plan, chunk, False, store, pipeline, run_id=run_id)
                return
            retry_redis(lambda: store.set_tasks(run_id, [t["id"] for t in plan.tasks], skipped=plan.skipped),
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


__all__ = ["cancel_run", "run_prelabel", "start_prelabel_in_background"]
