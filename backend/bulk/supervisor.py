"""Driving a bulk pre-label run (:mod:`backend.bulk.prelabel`) from start to end.

Entry points: :func:`run_prelabel` (``python -m backend prelabel``: blocks, with a tqdm bar),
:func:`start_prelabel_in_background` (``POST /prelabel``: returns the run id at once) and
:func:`cancel_run` (``DELETE /jobs/<id>``).

Embedded (no ``REDIS_URL``) the chunks run in this process, one after the other (nothing to
outlive: the run ends with the process). In queue mode they are RQ jobs on the ``prelabel`` queue
(:mod:`backend.queue.jobs`) and a *supervisor* follows the run's progress in Redis
(:class:`~backend.bulk.runstore.RedisRunStore`), shows it as a tqdm bar, survives Redis restarts,
re-enqueues lost work (in smaller jobs each round; after ``MAX_REQUEUE_ROUNDS`` rounds without
progress the rest is recorded failed), and cancels the run on Ctrl-C.

**Durable supervision.** A run's supervisor holds the run's lease (``gsam:run:<id>:lease``, SET PX
:data:`~backend.bulk.runstore.LEASE_TTL_S`, refreshed every poll) and acts only while it holds it; a
supervisor that finds the lease taken by someone else only follows the progress. Everything it
needs lives in Redis or LS: the run's spec, chunk size, task ids, done and failed sets and job ids
in Redis; the task data in LS. When the process that supervises a run dies (a web process
restarted mid-run, a killed CLI), its lease expires and the workers' housekeeping
(:func:`adopt_orphaned_runs`, one worker at a time every few seconds) takes the lease and starts
a supervisor thread in that worker. The adopter re-plans a run that died ``planning`` (from the
spec, against LS), or enqueues at once the pending tasks no queued or running job covers, then
supervises the run to ``done`` (or ``failed`` with reasons) like its creator would have.

**Model version.** In queue mode the run labels with the version the live workers serve (they
register it in Redis, see :func:`backend.queue.jobs.live_model_versions`); a run is refused when the
live workers disagree, or when no worker is live, unless a version is asked for explicitly.

This module never imports torch: the pipeline (and through it the models) is created only for
embedded runs, and only when a chunk is processed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Iterator

from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.client import LabelStudioApi, LabelStudioApiError
from backend.pipeline.predict import model_version as settings_model_version, prompt_limits
from backend.bulk.prelabel import PrelabelError, PrelabelPlan, PrelabelSpec, plan_prelabel, process_chunk
from backend.bulk.runstore import (CANCELLED, FAILED, FINAL, LEASE_TTL_S, PLANNING, RUNNING, MemoryRunStore, RedisRunStore,
                              RunStatus, RunStore)
from backend.queue.connection import retry_redis, transient_redis_errors
from backend.settings import Settings
from backend.ls.tasks import RequestError, split_prompt

log = logging.getLogger(__name__)

POLL_S = 0.5
#: No progress for this long while no job of the run is queued, scheduled or running = stalled.
STALL_S = 15.0
#: Re-enqueue rounds in a row without any progress before the rest is given up as failed.
MAX_REQUEUE_ROUNDS = 3
#: How often a supervisor refreshes its run's record expiry (a day, see backend.bulk.runstore).
TOUCH_EVERY_S = 60.0
#: How long starting a queue-mode run waits for a live worker to report its model version.
WORKER_WAIT_S = 10.0


def _versions_text(versions: dict[str, list[str]]) -> str:
    return ", ".join(f"{version!r} ({len(names)} worker{'s' if len(names) > 1 else ''})"
                     for version, names in sorted(versions.items()))


def served_model_version(connection, requested: str | None, wait_s: float = WORKER_WAIT_S) -> str:
    """The model version a queue-mode run labels with: the one the live workers serve, or
    ``requested``. Raises :class:`PrelabelError` (saying which versions are live) when the workers
    disagree and none was requested, when no live worker serves ``requested``, or when no worker is
    live and none was requested (waits up to ``wait_s`` for one to register first: workers that
    just started register within a second)."""
    from backend.queue import jobs

    requested = requested.strip() if requested and requested.strip() else None
    deadline = time.monotonic() + wait_s
    while True:
        versions = retry_redis(lambda: jobs.live_model_versions(connection), "listing the live workers")
        if versions or requested or time.monotonic() >= deadline:  # wait only when the workers must choose
            break
        time.sleep(0.5)
    if requested:
        if versions and requested not in versions:
            raise PrelabelError(f"no live worker serves model_version {requested!r}; the live workers serve "
                                f"{_versions_text(versions)}")
        if not versions:
            log.warning("no live worker yet: the run waits for workers that serve %r", requested)
        return requested
    if not versions:
        raise PrelabelError("no live worker: a queue-mode run takes its model_version from the workers. Start "
                            "`python -m backend worker`, or name the version explicitly (--model-version, or "
                            "'model_version' in the POST /prelabel body) to queue the run for workers yet to start")
    if len(versions) > 1:
        raise PrelabelError(f"the live workers serve different model versions: {_versions_text(versions)}; choose "
                            "one with --model-version (or 'model_version' in the POST /prelabel body)")
    return next(iter(versions))


def _prepare(settings: Settings, project: int, prompt: str | None, redo: bool, chunk: int,
             api: LabelStudioApi | None, connection=None, model_version: str | None = None,
             wait_s: float = WORKER_WAIT_S) -> tuple[LabelStudioApi, PrelabelSpec]:
    """Validate the request; the spec's model version comes from the live workers with a
    ``connection`` (queue mode), else from ``settings`` (embedded: this process runs the models)."""
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
    if connection is not None:
        version = served_model_version(connection, model_version, wait_s)
    else:
        version = settings_model_version(settings)
        if model_version and model_version.strip() and model_version.strip() != version:
            raise PrelabelError(f"this process serves model_version {version!r}, not {model_version.strip()!r} "
                                "(embedded mode: set the model settings or MODEL_VERSION instead)")
    return api, PrelabelSpec(project=int(project), label_config=config_xml, prompt=prompt, model_version=version,
                             redo=bool(redo))


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
                from backend.pipeline.predict import Pipeline

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
    """Queue mode: plan (a run created ``planning``), enqueue the chunks, then follow the run in
    Redis until it ends, holding the run's lease (see module doc).

    ``tasks`` (id + data) are what the creator planned; a supervisor that adopts a run passes None
    and gets the data of the tasks it must (re-)enqueue from LS. Without the lease (another process
    supervises) it only follows the run's progress.
    """

    def __init__(self, connection, store: RunStore, run_id: str, spec: PrelabelSpec, tasks: list[dict] | None,
                 chunk: int, api: LabelStudioApi | None, poll_s: float, stall_s: float, *,
                 owner: str | None = None, adopted: bool = False):
        self.connection = connection
        self.store = store
        self.run_id = run_id
        self.spec = spec
        self.tasks_by_id = {int(t["id"]): t for t in tasks or ()}
        self.all_tasks_known = tasks is not None  # enough to re-create the run if Redis loses it
        self.chunk = chunk
        self.api = api
        self.poll_s = poll_s
        self.stall_s = stall_s
        self.owner = owner or uuid.uuid4().hex
        self.outbox: list[list[dict]] = list(_chunks(tasks or [], chunk))  # chunks still to enqueue
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
                except Exception as exc:  # the main loop notices a lost lease at its next step
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
        except Exception as exc:  # it expires by itself
            log.warning("run %s: could not release its lease (%s)", self.run_id, type(exc).__name__)

    # ------------------------------------------------------------------ task data

    def _task_data(self, ids: list[int]) -> list[dict]:
        """id + data of ``ids`` (ascending): from the plan, else listed from LS. A task LS no
        longer has is recorded failed."""
        missing = {i for i in ids if i not in self.tasks_by_id}
        if missing and self.api is not None:
            with self._keeping_lease():
                for ref in self.api.iter_tasks(self.spec.project):
                    if ref.id in missing:
                        self.tasks_by_id[ref.id] = {"id": ref.id, "data": ref.data}
                        missing.discard(ref.id)
            for task_id in sorted(missing):
                self.store.mark_failed(self.run_id, task_id, "not processed: the task is no longer in the project")
        return [self.tasks_by_id[i] for i in sorted(ids) if i in self.tasks_by_id]

    # ------------------------------------------------------------------ planning, adoption, recovery

    def _plan(self) -> None:
        """The run is ``planning`` and ours: list its tasks in LS (again, after an adoption)."""
        try:
            with self._keeping_lease():
                plan = plan_prelabel(self.api, self.spec.project, self.spec.model_version, self.spec.redo)
        except (LabelStudioApiError, PrelabelError) as exc:
            log.error("run %s: planning failed: %s", self.run_id, exc)
            self.store.finish(self.run_id, FAILED, error=str(exc))
            return
        if self.store.state(self.run_id) != PLANNING:  # cancelled while planning
            return
        log.info("run %s: project %s: %d tasks to label, %d skipped (they have a %r prediction)", self.run_id,
                 self.spec.project, len(plan.tasks), plan.skipped, self.spec.model_version)
        self.store.set_tasks(self.run_id, [t["id"] for t in plan.tasks], skipped=plan.skipped)
        self.tasks_by_id = {int(t["id"]): t for t in plan.tasks}
        self.all_tasks_known = True
        self.outbox = list(_chunks(plan.tasks, self.chunk))
        self.must_adopt = False  # planned here: nothing was enqueued before
        self.last_change = time.monotonic()

    def _adopt(self) -> None:
        """The run's previous supervisor is gone: enqueue at once its pending tasks that no queued or
        running job covers (chunks it never enqueued, jobs that were lost with it)."""
        from backend.queue import jobs

        pending = self.store.pending(self.run_id)
        covered = jobs.run_tasks_in_flight(self.connection, self.run_id)
        todo = [i for i in pending if i not in covered]
        log.warning("run %s: supervising it (its supervisor is gone): %d tasks pending, %d in queued or running "
                    "jobs, enqueueing %d", self.run_id, len(pending), len(pending) - len(todo), len(todo))
        self.outbox = list(_chunks(self._task_data(todo), self.chunk))
        self.last_change = time.monotonic()

    def _enqueue_outbox(self) -> None:
        from backend.queue import jobs

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
                          created=self.last.created if self.last else None, chunk=self.chunk)
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
        self.outbox.extend(_chunks(self._task_data(pending), size))

    def _give_up(self) -> None:
        pending = self.store.pending(self.run_id)
        reason = (f"not processed: {MAX_REQUEUE_ROUNDS} re-enqueues in a row made no progress "
                  "(check the workers' logs; is `python -m backend worker` running?)")
        log.error("run %s: giving up on %d tasks: %s", self.run_id, len(pending), reason)
        for task_id in pending:
            self.store.mark_failed(self.run_id, task_id, reason)

    # ------------------------------------------------------------------ one round

    def step(self) -> RunStatus | None:
        """One supervision round; the final status when the run has ended, else None."""
        from backend.queue import jobs

        status = self.store.status(self.run_id)
        if status is None:
            if not self.all_tasks_known:  # an adopted run that expired or was flushed: nothing left to do
                log.warning("run %s vanished from Redis: no longer supervising it", self.run_id)
                return dataclasses.replace(self.last, status=FAILED, error="the run's record vanished") \
                    if self.last else RunStatus(id=self.run_id, project=self.spec.project, status=FAILED, total=0,
                                                done=0, failed=0, model_version=self.spec.model_version,
                                                error="the run's record vanished")
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
        if status.status == PLANNING:
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
            self._release()
            bar.close()

    def _note(self) -> str | None:
        from backend.queue import jobs

        if not self.has_lease:
            return "supervised by another process"
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
        from backend.queue import jobs

        jobs.cancel_run_jobs(connection, run_id)
    return changed


def run_prelabel(settings: Settings, project: int, prompt: str | None = None, chunk: int = 16, redo: bool = False,
                 progress: bool = True, store: RunStore | None = None, connection=None, *,
                 api: LabelStudioApi | None = None, pipeline=None, poll_s: float = POLL_S,
                 stall_s: float = STALL_S, model_version: str | None = None) -> RunStatus:
    """Pre-label ``project``; returns the final status (``done``, or ``cancelled`` after Ctrl-C).

    Embedded without ``settings.redis_url`` (and no ``connection``): chunks run here, on
    ``pipeline`` or a new :class:`~backend.pipeline.predict.Pipeline`. Queue mode otherwise (see module doc):
    this process supervises the run while it lives (it holds the run's lease); the workers adopt
    the run if it dies. ``model_version``: see :func:`served_model_version`.
    Raises :class:`PrelabelError` for a bad request and :class:`LabelStudioApiError` when LS
    refuses or cannot be reached while planning.
    """
    queue_mode = connection is not None or bool(settings.redis_url)
    if queue_mode and connection is None:
        from backend.queue import jobs

        connection = jobs.connect(settings.redis_url)
    api, spec = _prepare(settings, project, prompt, redo, chunk, api, connection if queue_mode else None,
                         model_version)
    plan = plan_prelabel(api, spec.project, spec.model_version, spec.redo)
    log.info("project %s: %d tasks to label, %d skipped (they have a %r prediction)", project, len(plan.tasks),
             plan.skipped, spec.model_version)
    if not queue_mode:
        return _embedded(settings, api, spec, plan, chunk, progress, store, pipeline)
    store = store or RedisRunStore(connection)
    ids = [t["id"] for t in plan.tasks]
    run_id = retry_redis(lambda: store.create(spec, ids, skipped=plan.skipped, chunk=chunk), "creating the run")
    supervisor = _Supervisor(connection, store, run_id, spec, plan.tasks, chunk, api, poll_s, stall_s)
    return supervisor.run(progress)


def start_prelabel_in_background(settings: Settings, project: int, prompt: str | None = None, chunk: int = 16,
                                 redo: bool = False, *, store: RunStore, connection=None,
                                 api: LabelStudioApi | None = None, pipeline=None, poll_s: float = POLL_S,
                                 stall_s: float = STALL_S, model_version: str | None = None,
                                 wait_s: float = 3.0) -> str:
    """``POST /prelabel``: validate (project config, prompt, model version: raises like
    :func:`run_prelabel`), create the run in status ``planning`` and return its id at once; a daemon
    thread lists the tasks and supervises the run (queue mode: holding its lease, so a worker adopts
    the run if this process dies) or processes it (embedded, on ``pipeline``: pass the web app's).
    Follow it with ``store.status(run_id)``: pass a store the caller keeps (the web app's), a
    :class:`~backend.bulk.runstore.RedisRunStore` on ``connection`` in queue mode. ``wait_s``: how long to
    wait for a live worker to report its model version."""
    queue_mode = connection is not None or bool(settings.redis_url)
    if queue_mode and connection is None:
        from backend.queue import jobs

        connection = jobs.connect(settings.redis_url)
    api, spec = _prepare(settings, project, prompt, redo, chunk, api, connection if queue_mode else None,
                         model_version, wait_s)
    run_id = store.create(spec, None, chunk=chunk)
    if queue_mode:
        supervisor = _Supervisor(connection, store, run_id, spec, None, chunk, api, poll_s, stall_s)
        store.take_lease(run_id, supervisor.owner)  # before answering: no worker adopts a run just started

    def main() -> None:
        try:
            if queue_mode:
                supervisor.run(False)
                return
            plan = plan_prelabel(api, spec.project, spec.model_version, spec.redo)
            if store.state(run_id) != PLANNING:  # cancelled while planning
                return
            _embedded(settings, api, spec, plan, chunk, False, store, pipeline, run_id=run_id)
        except Exception as exc:
            log.exception("run %s failed", run_id)
            try:
                store.finish(run_id, FAILED, error=str(exc) if isinstance(exc, (LabelStudioApiError, PrelabelError))
                             else f"{type(exc).__name__}: {exc}")
            except Exception:
                log.error("run %s: could not record its failure", run_id)

    threading.Thread(target=main, name=f"prelabel-{run_id}", daemon=True).start()
    return run_id


def adopt_orphaned_runs(connection, settings: Settings) -> list[str]:
    """Take over the runs whose supervisor is gone (a worker's housekeeping calls this every few
    seconds): for each planning or running run whose lease expired, take the lease and start a
    supervisor thread here. Returns the ids of the runs adopted. Needs LS credentials (to plan and to
    read task data); a process without them adopts nothing."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        return []
    store = RedisRunStore(connection)
    adopted = []
    for run_id in store.active_run_ids():
        owner = uuid.uuid4().hex
        if not store.take_lease(run_id, owner):  # free leases only: a live supervisor keeps refreshing its own
            continue
        try:
            spec, chunk = store.spec(run_id), store.chunk(run_id) or 16
        except (ValueError, KeyError, TypeError) as exc:  # unreadable here: keep the lease, so retry when it expires
            log.error("run %s: unreadable record (%s): not adopting it", run_id, type(exc).__name__)
            continue
        if spec is None:
            store.release_lease(run_id, owner)
            continue
        log.warning("run %s (project %s): its supervisor is gone; adopting it", run_id, spec.project)
        threading.Thread(target=_supervise_adopted, args=(settings, run_id, spec, chunk, owner),
                         name=f"adopted-{run_id}", daemon=True).start()
        adopted.append(run_id)
    return adopted


def _supervise_adopted(settings: Settings, run_id: str, spec: PrelabelSpec, chunk: int, owner: str) -> None:
    from backend.queue import jobs

    connection = jobs.connect(settings.redis_url)
    try:
        with LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key) as api:
            final = _Supervisor(connection, RedisRunStore(connection), run_id, spec, None, chunk, api, POLL_S, STALL_S,
                                owner=owner, adopted=True).run(False)
        log.info("adopted run %s ended: %s, %d done, %d failed of %d", run_id, final.status, final.done,
                 final.failed, final.total)
    except Exception:  # the lease expires and another round (here or in another worker) tries again
        log.exception("adopted run %s: supervision stopped", run_id)
    finally:
        connection.close()


__all__ = ["adopt_orphaned_runs", "cancel_run", "run_prelabel", "served_model_version",
           "start_prelabel_in_background"]
