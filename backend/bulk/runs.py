"""Bulk runs as the web layer and the CLI see them: the :class:`Runs` interface and its two
implementations, one per mode (each mode object of :mod:`backend.modes` holds one).

- :class:`EmbeddedRuns` (no Redis): the chunks run one after the other in this process, on the
  mode's pipeline; run records live in a :class:`~backend.bulk.memorystore.MemoryRunStore` and end
  with the process. The run's model version is the pipeline's.
- :class:`QueueRuns`: the chunks are RQ jobs (a :class:`~backend.bulk.supervisor.ChunkQueue`) and a
  :class:`~backend.bulk.supervisor.Supervisor` in this process follows the run in Redis; if this
  process dies, a worker adopts the run (:mod:`backend.bulk.adopt`). The run's model version is the
  one the live workers serve (:func:`served_model_version`).

Both validate a :class:`~backend.bulk.request.RunRequest` the same way (the project's label config,
the prompt, the model version) and raise :class:`~backend.bulk.request.PrelabelError` (a request to
fix) or :class:`~backend.ls.client.LabelStudioApiError` (LS refused or is unreachable).

Imports the bulk modules, :mod:`backend.queue.connection` (no redis-py at import) and the pipeline's
torch-free helpers; RQ only lazily, in queue mode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from backend.batching import chunks
from backend.bulk.memorystore import MemoryRunStore
from backend.bulk.prelabel import fail_tasks, plan_prelabel, process_chunk
from backend.bulk.redisstore import RedisRunStore
from backend.bulk.request import PrelabelError, RunRequest
from backend.bulk.runstore import RunStore
from backend.bulk.spec import BulkTask, PrelabelSpec
from backend.bulk.status import RunState, RunStatus
from backend.bulk.progress import ProgressBar
from backend.bulk.supervisor import POLL_S, STALL_S, ChunkQueue, Supervisor, cancel_run
from backend.errors import EngineNotServed
from backend.ls.client import LabelStudioApi, LabelStudioApiError
from backend.ls.engines import choose_engine
from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.tasks import RequestError, split_prompt
from backend.pipeline.predict import prompt_limits
from backend.queue.connection import retry_redis
from backend.settings import Settings

log = logging.getLogger(__name__)

#: How long ``run`` (the CLI) waits for a live worker to report its model version.
WORKER_WAIT_S = 10.0
#: The same for ``start`` (``POST /prelabel``: an HTTP client is waiting).
START_WAIT_S = 3.0


class Runs(Protocol):
    """Start, follow and cancel bulk pre-label runs."""

    def start(self, request: RunRequest) -> RunStatus:
        """``POST /prelabel``: validate, create the run (``planning``) and return at once; a thread
        plans and runs it."""
        ...

    def run(self, request: RunRequest, *, progress: bool = True) -> RunStatus:
        """``python -m backend prelabel``: run to the end (a tqdm bar with ``progress``; Ctrl-C
        cancels); the final status."""
        ...

    def status(self, run_id: str) -> RunStatus | None:
        """None: no such run (never was, or expired)."""
        ...

    def cancel(self, run_id: str) -> RunStatus | None:
        """Cancel a planning or running run (its status after); None: no such run."""
        ...


def _versions_text(versions: dict[str, list[str]]) -> str:
    return ", ".join(f"{version!r} ({len(names)} worker{'s' if len(names) > 1 else ''})"
                     for version, names in sorted(versions.items()))


def served_model_version(chunks_queue: ChunkQueue, requested: str | None, wait_s: float = WORKER_WAIT_S,
                         engine: str | None = None) -> str:
    """The model version a queue-mode run labels with: the one the live workers serve, or
    ``requested``. Raises :class:`PrelabelError` (saying which versions are live) when the workers
    disagree and none was requested, when no live worker serves ``requested``, or when no worker is
    live and none was requested (waits up to ``wait_s`` for one to register first: workers that
    just started register within a second)."""
    deadline = time.monotonic() + wait_s
    while True:
        versions = retry_redis(lambda: chunks_queue.live_model_versions(engine), "listing the live workers")
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


def _failure_text(exc: Exception) -> str:
    """Why a run or a chunk stopped: LS's and the request's own messages as they are, else the type too."""
    return str(exc) if isinstance(exc, (LabelStudioApiError, PrelabelError)) else f"{type(exc).__name__}: {exc}"


class _RunsBase:
    """What both modes share: validation, the shape of ``start``/``run``/``cancel``, the background
    thread. A mode supplies :meth:`_model_version`, :meth:`_follow` (what ``start``'s thread does),
    :meth:`_drive` (how planned tasks are run) and :meth:`_cancel`."""

    def __init__(self, settings: Settings, store: RunStore, api_factory: Callable[[], LabelStudioApi] | None):
        self.settings = settings
        self.store = store
        self.api_factory = api_factory or (lambda: LabelStudioApi(settings.label_studio_url,
                                                                  settings.label_studio_api_key))

    # ------------------------------------------------------------------ what a mode supplies

    def _model_version(self, requested: str | None, wait_s: float, engine: str) -> str:
        raise NotImplementedError

    def _served(self) -> dict[str, list[str]]:
        """Engine -> the model versions it serves now (what a project's choice is resolved against)."""
        raise NotImplementedError

    def _follow(self, api: LabelStudioApi, spec: PrelabelSpec, run_id: str, chunk: int) -> Callable[[], object]:
        """What the thread of a run started ``planning`` does (plan it, then run it to its end)."""
        raise NotImplementedError

    def _drive(self, api: LabelStudioApi, spec: PrelabelSpec, run_id: str, tasks: list[BulkTask], chunk: int,
               progress: bool) -> RunStatus:
        """Run the planned ``tasks`` of a ``running`` run to its end; the final status."""
        raise NotImplementedError

    def _cancel(self, run_id: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ Runs

    def start(self, request: RunRequest) -> RunStatus:
        api, spec = self._open(request, START_WAIT_S)
        run_id = self.store.create(spec, None, chunk=request.chunk, scope=request.task_ids)
        self._in_background(run_id, api, self._follow(api, spec, run_id, request.chunk))
        return self.store.status(run_id)

    def run(self, request: RunRequest, *, progress: bool = True) -> RunStatus:
        api, spec = self._open(request, WORKER_WAIT_S)
        with api:
            plan = plan_prelabel(api, spec.project, spec.model_version, spec.redo, task_ids=request.task_ids)
            log.info("project %s: %d tasks to label, %d skipped (they have a %r prediction)", spec.project,
                     len(plan.tasks), plan.skipped, spec.model_version)
            ids = [t.id for t in plan.tasks]
            run_id = retry_redis(lambda: self.store.create(spec, ids, skipped=plan.skipped, chunk=request.chunk,
                                                           scope=request.task_ids), "creating the run")
            return self._drive(api, spec, run_id, plan.tasks, request.chunk, progress)

    def status(self, run_id: str) -> RunStatus | None:
        return self.store.status(run_id)

    def cancel(self, run_id: str) -> RunStatus | None:
        if self.store.status(run_id) is None:
            return None
        self._cancel(run_id)
        return self.store.status(run_id)

    # ------------------------------------------------------------------ helpers

    def _spec(self, api: LabelStudioApi, request: RunRequest, wait_s: float) -> PrelabelSpec:
        """Check the project's label config and the prompt; the model version is the mode's."""
        config_xml = api.label_config(request.project)
        try:
            parse_label_config(config_xml)
        except LabelConfigError as exc:
            raise PrelabelError(f"project {request.project}: {exc}") from None
        prompt = request.prompt
        if prompt:
            try:
                if not split_prompt(prompt, prompt_limits(self.settings)):
                    prompt = None
            except RequestError as exc:
                raise PrelabelError(str(exc)) from None
        options = request.options
        if request.model_version is not None:  # the run's own choice of version wins over the project's
            options = replace(options, model_version=request.model_version)
        try:
            engine = choose_engine(options, self.settings.engine.value, self._served())
        except EngineNotServed:  # a version no worker serves yet: the run waits for its workers
            engine = options.engine or self.settings.engine.value
        return PrelabelSpec(project=request.project, label_config=config_xml, prompt=prompt, engine=engine,
                            model_version=self._model_version(options.model_version, wait_s, engine), redo=request.redo,
                            options=request.options)

    def _open(self, request: RunRequest, wait_s: float) -> tuple[LabelStudioApi, PrelabelSpec]:
        """An LS client and the run's spec; the client is closed again when validation fails."""
        api = self.api_factory()
        try:
            return api, self._spec(api, request, wait_s)
        except BaseException:
            api.close()
            raise

    def _in_background(self, run_id: str, api: LabelStudioApi, main: Callable[[], object]) -> None:
        """Run ``main`` in a daemon thread; a failure ends the run ``failed`` with the reason."""

        def guarded() -> None:
            try:
                main()
            except Exception as exc:  # noqa: BLE001 - recorded as the run's error, the thread ends
                log.exception("run %s failed", run_id)
                try:
                    self.store.finish(run_id, RunState.FAILED, error=_failure_text(exc))
                except Exception:  # noqa: BLE001 - Redis gone too: the record expires by itself
                    log.error("run %s: could not record its failure", run_id)
            finally:
                api.close()

        threading.Thread(target=guarded, name=f"prelabel-{run_id}", daemon=True).start()


class EmbeddedRuns(_RunsBase):
    """Runs whose chunks go through ``pipeline`` in this process (see the module docstring)."""

    def __init__(self, settings: Settings, pipeline, store: MemoryRunStore | None = None,
                 api_factory: Callable[[], LabelStudioApi] | None = None, pipelines: dict | None = None):
        super().__init__(settings, store or MemoryRunStore(), api_factory)
        self.pipeline = pipeline
        self.pipelines = pipelines or {settings.engine.value: pipeline}  # engine -> its pipeline (ENGINES)

    def _served(self) -> dict[str, list[str]]:
        return {engine: [pipeline.model_version] for engine, pipeline in self.pipelines.items()}

    def _pipeline_for(self, spec: PrelabelSpec):
        if spec.engine not in self.pipelines:
            raise PrelabelError(f"engine {spec.engine!r} is not loaded by this process (ENGINES="
                                f"{','.join(self.pipelines)}): add it to ENGINES and restart")
        return self.pipelines[spec.engine]

    def _model_version(self, requested: str | None, wait_s: float, engine: str) -> str:
        if engine not in self.pipelines:
            raise PrelabelError(f"engine {engine!r} is not loaded by this process (ENGINES="
                                f"{','.join(self.pipelines)}): add it to ENGINES and restart")
        version = self.pipelines[engine].model_version
        if requested and requested != version:
            raise PrelabelError(f"this process serves model_version {version!r}, not {requested!r} "
                                "(embedded mode: set the model settings or MODEL_VERSION instead)")
        return version

    def _follow(self, api, spec, run_id, chunk):
        def main() -> None:
            plan = plan_prelabel(api, spec.project, spec.model_version, spec.redo, task_ids=self.store.scope(run_id))
            if self.store.state(run_id) != RunState.PLANNING:  # cancelled while planning
                return
            self.store.set_tasks(run_id, [t.id for t in plan.tasks], skipped=plan.skipped)
            self._drive(api, spec, run_id, plan.tasks, chunk, progress=False)

        return main

    def _drive(self, api, spec, run_id, tasks, chunk, progress):
        """The chunks one after the other, until done or cancelled (Ctrl-C cancels)."""
        bar = ProgressBar(progress, len(tasks), spec.project)
        try:
            for part in chunks(tasks, chunk):
                if self.store.state(run_id) != RunState.RUNNING:
                    break
                try:
                    process_chunk(self._pipeline_for(spec), api, self.store, run_id, spec, part)
                except Exception as exc:  # noqa: BLE001 - one bad chunk must not end the run: record why, go on
                    log.exception("run %s: a chunk of %d tasks failed", run_id, len(part))
                    fail_tasks(self.store, run_id, part, f"chunk failed: {_failure_text(exc)}")
                bar.show(self.store.status(run_id))
            self.store.finish(run_id)
        except KeyboardInterrupt:
            self.store.cancel(run_id)
            log.warning("run %s cancelled", run_id)
        finally:
            bar.show(self.store.status(run_id))
            bar.close()
        return self.store.status(run_id)

    def _cancel(self, run_id):
        self.store.cancel(run_id)


class QueueRuns(_RunsBase):
    """Runs whose chunks are RQ jobs, supervised from this process (see the module docstring).
    ``chunks``: where the chunks go (default: RQ on ``connection``)."""

    def __init__(self, settings: Settings, connection, store: RedisRunStore | None = None, *,
                 chunks: ChunkQueue | None = None, poll_s: float = POLL_S, stall_s: float = STALL_S,
                 api_factory: Callable[[], LabelStudioApi] | None = None):
        super().__init__(settings, store or RedisRunStore(connection), api_factory)
        if chunks is None:
            from backend.bulk.chunkjob import RqChunkQueue  # RQ only in queue mode

            chunks = RqChunkQueue(connection)
        self.chunks = chunks
        self.poll_s = poll_s
        self.stall_s = stall_s

    def _served(self) -> dict[str, list[str]]:
        versions = retry_redis(self.chunks.live_engines, "listing the live workers")
        return {engine: sorted(by_version) for engine, by_version in versions.items()}

    def _model_version(self, requested: str | None, wait_s: float, engine: str) -> str:
        return served_model_version(self.chunks, requested, wait_s, engine)

    def _supervisor(self, api: LabelStudioApi, spec: PrelabelSpec, run_id: str, tasks: list[BulkTask] | None,
                    chunk: int) -> Supervisor:
        return Supervisor(self.store, self.chunks, run_id, spec, tasks, chunk, api, poll_s=self.poll_s,
                          stall_s=self.stall_s)

    def _follow(self, api, spec, run_id, chunk):
        supervisor = self._supervisor(api, spec, run_id, None, chunk)  # it plans the run
        self.store.take_lease(run_id, supervisor.owner)  # before answering: no worker adopts a run just started
        return lambda: supervisor.run(False)

    def _drive(self, api, spec, run_id, tasks, chunk, progress):
        return self._supervisor(api, spec, run_id, tasks, chunk).run(progress)

    def _cancel(self, run_id):
        cancel_run(self.store, self.chunks, run_id)


__all__ = ["EmbeddedRuns", "QueueRuns", "Runs", "START_WAIT_S", "WORKER_WAIT_S", "served_model_version"]
