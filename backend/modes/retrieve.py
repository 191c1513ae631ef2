""""Retrieve predictions" of any size: a batch ``/predict`` answers within ``RETRIEVE_BUDGET``.

Label Studio sends the whole Data Manager selection in one synchronous ``/predict`` and abandons it
after ``ML_TIMEOUT_PREDICT`` (100 s). When the budget applies, :class:`Retrieve` runs the selection
in chunks (``BATCH_SIZE`` tasks; one task per chunk in a video project) on the deployment's
:class:`~backend.modes.base.Backend` until ``RETRIEVE_BUDGET`` seconds after the request arrived,
answers what is finished, and answers ``[]`` for every other task: those become one bulk run
(:mod:`backend.bulk`, ``RunRequest.task_ids``) that writes their predictions back through the LS
API, idempotently (one per task and model version), with its progress at ``GET /jobs/<id>``.

Why ``[]`` works, in LS 1.23.2's ``label_studio/ml/models.py``, ``MLBackend._get_predictions_from_ml_backend``:
``results`` must be a non-empty list (line 302) with one entry per task (line 311; otherwise LS asks
again task by task, or stores nothing). For each ``(task, response)`` pair (line 318) a dict is wrapped
in a list (lines 319-321), and one prediction is stored per item of that list (line 324). So an
empty list stores nothing for its task. An empty *prediction* (``{"result": []}``) would be stored,
with our model_version. LS's next Retrieve leaves out tasks that have a prediction of the version
(``predict_tasks``, lines 353-356), and every bulk run skips them unless ``redo``, so the task would
stay empty for good.
So a task that is not labeled now is always answered ``[]``, also when the bulk run cannot start
(logged at WARNING): the next "Retrieve predictions" sends it again.

The budget applies to a request with more than one task, no context (LS's Retrieve predictions and
its automatic predictions on import; interactive calls keep their own path), a known project, task
ids LS gave, ``RETRIEVE_BUDGET`` > 0 and LS credentials (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``: the bulk run writes through the LS API). Without credentials the request
is served as before (and a selection over ``MAX_TASKS_PER_REQUEST`` answered 413), and the log says
why. With the budget a selection may hold up to :data:`RETRIEVE_MAX_TASKS` tasks: the first
``MAX_TASKS_PER_REQUEST`` are tried now, the rest go to the bulk run at once.

Tasks that this process already deferred to a run that is still planning or running are answered
``[]`` again without any work (a second click on "Retrieve predictions" while the run goes on):
labeling them now too would race the run's write-back, which cannot see LS storing our answer.
The same holds for LS's call when such a task is opened (one task, no context). That guard is per
web process (the default: one gunicorn process with threads).

Chunks still running at the deadline are not waited for; their results are discarded (their tasks
are in the bulk run). Embedded mode runs the chunks one at a time (the pipeline batches and
overlaps stages itself); queue mode keeps :data:`QUEUE_THREADS` chunks in flight so that several
workers share them.

Imports the bulk request, the LS protocol modules, queue errors and the foundation; never torch.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import replace

from backend.bulk.request import MAX_RUN_TASK_IDS, PrelabelError, RunRequest
from backend.ls.client import LabelStudioApiError
from backend.ls.tasks import PredictRequest, parse_predict_request
from backend.modes.base import Backend, Mode
from backend.queue.errors import QueueError, QueueTimeout
from backend.settings import DEFAULT_BATCH_SIZE, Settings

log = logging.getLogger(__name__)

#: The most tasks one "Retrieve predictions" call may send when the budget applies (the bulk run's
#: bound on ``task_ids``; 100,000 LS tasks are about the 64 MB body limit anyway).
RETRIEVE_MAX_TASKS = MAX_RUN_TASK_IDS
#: Chunks in flight at once in queue mode (each one RQ job on ``interactive``).
QUEUE_THREADS = 4

NO_CREDENTIALS = ("RETRIEVE_BUDGET does not apply: the tasks not labeled in time would be written back through "
                  "the Label Studio API; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")


def _task_id(task: dict) -> int | None:
    value = task.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


class Retrieve:
    """The budget of one app (see the module docstring): :meth:`parse` a ``/predict`` body, then
    :meth:`predict` it."""

    def __init__(self, settings: Settings, backend: Backend):
        self.settings = settings
        self.backend = backend
        self.budget = settings.retrieve_budget
        self._lock = threading.Lock()
        self._deferred: dict[int, str] = {}  # task id -> the active run this process deferred it to
        self._told = False  # the missing credentials were logged at WARNING once

    # ------------------------------------------------------------------ when it applies

    def _possible(self, project: int | None, task_count: int) -> bool:
        """Whether the budget may apply to a request of ``project`` with ``task_count`` tasks (before
        looking at its context and ids); logs why not when only the credentials are missing."""
        if self.budget <= 0 or project is None or task_count < 2:
            return False
        if not self.settings.has_label_studio_credentials:
            level = logging.INFO if self._told else logging.WARNING
            self._told = True
            log.log(level, "predict: %d tasks of project %d: %s", task_count, project, NO_CREDENTIALS)
            return False
        return True

    def applies(self, request: PredictRequest, project: int | None) -> bool:
        """True for a batch request (no context) of more than one task, all with LS task ids, of a
        known project, with RETRIEVE_BUDGET > 0 and LS credentials."""
        if request.context is not None or len(request.tasks) < 2:
            return False
        if not self._possible(project, len(request.tasks)):
            return False
        if any(_task_id(task) is None for task in request.tasks):
            log.info("predict: RETRIEVE_BUDGET does not apply: a task has no Label Studio task id")
            return False
        return True

    def parse(self, body: dict, project: int | None) -> PredictRequest:
        """:func:`parse_predict_request` with the deployment's bounds, except that a selection over
        MAX_TASKS_PER_REQUEST (up to :data:`RETRIEVE_MAX_TASKS`) is taken where the budget applies
        to it; elsewhere the same 413 as before."""
        limits = self.backend.limits
        tasks = body.get("tasks")
        count = len(tasks) if isinstance(tasks, list) else 0
        if count <= limits.max_tasks or not self._possible(project, count):
            return parse_predict_request(body, limits)
        request = parse_predict_request(body, replace(limits, max_tasks=max(limits.max_tasks, RETRIEVE_MAX_TASKS)))
        if not self.applies(request, project):
            return parse_predict_request(body, limits)  # raises the usual 413
        return request

    # ------------------------------------------------------------------ the answer

    def predict(self, request: PredictRequest, project: int | None, since: float | None = None) -> list:
        """One entry per task, in task order: ``backend.predict``'s predictions where the budget does
        not apply; else predictions for the tasks finished within RETRIEVE_BUDGET seconds of ``since``
        (a ``time.perf_counter()`` value, default now) and ``[]`` for the rest, deferred to a bulk run."""
        if not self.applies(request, project):
            if request.context is None and project is not None and self._all_left_to_runs(request):
                log.info("predict: project %d: %d tasks left to the bulk run already labeling them", project,
                         len(request.tasks))  # e.g. a task opened before the run reached it: no race with it
                return [[] for _ in request.tasks]
            return self.backend.predict(request)
        deadline = (time.perf_counter() if since is None else since) + self.budget
        tasks = request.tasks
        covered = self._in_active_runs([_task_id(t) for t in tasks])
        todo = [i for i, task in enumerate(tasks) if _task_id(task) not in covered]
        now, later = todo[:self.backend.limits.max_tasks], todo[self.backend.limits.max_tasks:]
        size = 1 if request.config.is_video else (self.settings.batch_size or DEFAULT_BATCH_SIZE)
        parts = [now[i:i + size] for i in range(0, len(now), size)]
        answers: list = [[] for _ in tasks]
        finished = self._run_chunks(request, parts, deadline)
        deferred = list(later)
        for part, predictions in zip(parts, finished):
            if predictions is None:
                deferred.extend(part)
            else:
                for index, prediction in zip(part, predictions):
                    answers[index] = prediction
        deferred_ids = [_task_id(tasks[i]) for i in sorted(deferred)]
        run_id = self._defer(request, project, deferred_ids) if deferred_ids else None
        log.info("predict: project %d: %d tasks, RETRIEVE_BUDGET %.0f s: %d answered, %d deferred to bulk run %s, "
                 "%d left to the bulk run already labeling them", project, len(tasks), self.budget,
                 len(tasks) - len(deferred_ids) - len(covered), len(deferred_ids), run_id or "-", len(covered))
        return answers

    def _run_chunks(self, request: PredictRequest, parts: list[list[int]], deadline: float) -> list[list | None]:
        """Each part's predictions, or None for a part not finished by ``deadline`` (or whose wait
        for a worker timed out). Any other error of a chunk is the request's (raised)."""
        if not parts:
            return []
        stop = threading.Event()

        def run(part: list[int]) -> list[dict] | None:
            if stop.is_set():  # the deadline passed before this chunk started
                return None
            return self.backend.predict(replace(request, tasks=[request.tasks[i] for i in part]))

        threads = QUEUE_THREADS if self.backend.mode == Mode.QUEUE else 1
        pool = ThreadPoolExecutor(max_workers=min(threads, len(parts)), thread_name_prefix="retrieve")
        futures: list[Future] = [pool.submit(run, part) for part in parts]
        try:
            pending = set(futures)
            while pending and (left := deadline - time.perf_counter()) > 0:
                done, pending = wait(pending, timeout=left, return_when=FIRST_EXCEPTION)
                for future in done:
                    error = future.exception()
                    if error is not None and not isinstance(error, QueueTimeout):
                        raise error  # the models cannot load, no worker, a bad prompt: as before
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)  # a running chunk ends by itself; not waited for
        return [future.result() if future.done() and not future.cancelled() and future.exception() is None
                else None for future in futures]

    def _defer(self, request: PredictRequest, project: int, task_ids: list[int]) -> str | None:
        """Start the bulk run over ``task_ids``; its id, or None (logged) when it cannot start."""
        try:
            status = self.backend.runs.start(RunRequest(project=project, prompt=request.prompt or None,
                                                        options=request.options, task_ids=tuple(task_ids)))
        except Exception as exc:  # noqa: BLE001 - never lose the finished predictions to a 500
            reason = str(exc) if isinstance(exc, (PrelabelError, LabelStudioApiError, QueueError)) \
                else f"{type(exc).__name__}: {exc}"
            log.warning("predict: project %d: %d tasks not labeled within RETRIEVE_BUDGET are answered empty, and "
                        "the bulk run for them could not start (%s); run Retrieve predictions on them again",
                        project, len(task_ids), reason)
            return None
        with self._lock:
            self._deferred.update(dict.fromkeys(task_ids, status.id))
        self.backend.metrics.retrieve_deferred_tasks.inc(len(task_ids))
        return status.id

    def _all_left_to_runs(self, request: PredictRequest) -> bool:
        """Every task of ``request`` was deferred by this process to a run that is still going on."""
        if not self._deferred:  # no lock: a run started meanwhile cannot hold these tasks yet
            return False
        ids = [_task_id(task) for task in request.tasks]
        return None not in ids and self._in_active_runs(ids) == set(ids)

    def _in_active_runs(self, task_ids: list[int | None]) -> set[int]:
        """Those of ``task_ids`` this process deferred to a run that is still planning or running."""
        with self._lock:
            for run_id in set(self._deferred.values()):
                try:
                    status = self.backend.runs.status(run_id)
                except Exception as exc:  # noqa: BLE001 - the store is unreachable: keep treating it as active
                    log.warning("predict: bulk run %s: status unknown (%s)", run_id, type(exc).__name__)
                    continue
                if status is None or not status.status.active:
                    self._deferred = {t: r for t, r in self._deferred.items() if r != run_id}
            return {t for t in task_ids if t is not None and t in self._deferred}


__all__ = ["NO_CREDENTIALS", "QUEUE_THREADS", "RETRIEVE_MAX_TASKS", "Retrieve"]
