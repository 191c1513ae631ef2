"""Pre-warming: after a /predict for one task, encode the SAM embeddings of the project's next few
tasks in the background, so the annotator's first click on the next task is a cache hit.

One daemon thread per pipeline does the work, at low priority: before each image it waits until no
predict call is running (:meth:`Pipeline.wait_idle`), and it holds the engine for one encoder call
at a time, so an annotator's request waits at most one encoder call behind it. Requests that come
while it works replace what it was asked to do (only the latest task's neighbours matter), and
tasks already cached are skipped (no encoder call). What it may keep is bounded by the embedding
cache: it stops once the embeddings it added would take more than half of ``EMBEDDING_CACHE_MB``,
so the annotator's current image is never pushed out by its own pre-warming.

"Next" is the order of the project's first Data Manager tab, its sorting and filters (ascending
task id without one), through the LS API (:meth:`backend.ls.client.LabelStudioApi.next_tasks`), read
with the backend's LS credentials; the images are fetched by the pipeline's loader under the usual
URL policy and limits.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from backend.errors import ImageError, ReasonError
from backend.ls.client import LabelStudioApi
from backend.ls.labelconfig import LabelConfig, parse_label_config
from backend.ls.options import ENGINE_NAMES
from backend.ls.tasks import PredictRequest, plan_tasks

log = logging.getLogger(__name__)

MAX_WARM_TASKS = 100  # same bound as PREWARM_TASKS
IDLE_WAIT_S = 0.5  # re-check for newer work this often while predict calls keep the pipeline busy


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class WarmRequest:
    """Encode the next ``count`` tasks of ``project`` after task ``after`` (None: from the first).
    ``config``: the project's label config, or None to read it from LS first. ``engine``: the
    project's engine (queue mode: only its workers warm; None: every worker)."""

    project: int
    after: int | None
    count: int
    config: LabelConfig | None = None
    engine: str | None = None

    def __post_init__(self):
        if not _is_id(self.project):
            raise ValueError(f"project={self.project!r}: a Label Studio project id is a positive integer")
        if self.after is not None and not _is_id(self.after):
            raise ValueError(f"after={self.after!r}: a Label Studio task id is a positive integer")
        if not _is_id(self.count) or self.count > MAX_WARM_TASKS:
            raise ValueError(f"tasks={self.count!r}: warm between 1 and {MAX_WARM_TASKS} tasks")
        if self.engine is not None and self.engine not in ENGINE_NAMES:
            raise ValueError(f"engine={self.engine!r:.40}: not an engine ({', '.join(ENGINE_NAMES)})")

    def to_json(self) -> dict:
        """``{"project", "after", "count", "label_config": XML | None, "engine"}`` (queue mode's broadcast)."""
        return {"project": self.project, "after": self.after, "count": self.count,
                "label_config": self.config.xml if self.config is not None else None, "engine": self.engine}

    @classmethod
    def from_json(cls, value: object) -> WarmRequest:
        """The inverse of :meth:`to_json`, checking everything (it crossed Redis): ValueError says what."""
        if not isinstance(value, dict):
            raise ValueError("a warm request is a JSON object")
        xml = value.get("label_config")
        if xml is not None and not isinstance(xml, str):
            raise ValueError("'label_config' must be the project's XML label config or null")
        config = parse_label_config(xml) if xml is not None else None  # LabelConfigError is a ValueError
        return cls(value.get("project"), value.get("after"), value.get("count"), config, value.get("engine"))


def after_predict(project: int, request: PredictRequest, count: int) -> WarmRequest | None:
    """What to warm after a /predict of ``project``: its ``count`` tasks after the request's one task;
    None when there is nothing to do (``count`` 0, several tasks: a bulk call, not an annotator, or a
    task without a usable id)."""
    task_id = request.tasks[0].get("id") if len(request.tasks) == 1 else None
    if count == 0 or not _is_id(task_id) or not _is_id(project) or request.config.is_video:
        return None  # a video project has no image embeddings to warm
    return WarmRequest(project, task_id, count, request.config)


class Prewarmer:
    """``submit(WarmRequest)`` returns at once; :meth:`warm` does the same work in the caller's
    thread (``POST /warm`` in embedded mode, tests). ``api_factory`` builds the LS client (default:
    from the settings). ``owns(task id)``: whether to encode that task here (queue mode: the tasks
    this worker owns, :mod:`backend.queue.affinity`; None: every task)."""

    def __init__(self, pipeline, api_factory: Callable[[], LabelStudioApi] | None = None,
                 owns: Callable[[int], bool] | None = None):
        self.pipeline = pipeline
        self.owns = owns
        settings = pipeline.settings
        self._api_factory = api_factory or (lambda: LabelStudioApi(settings.label_studio_url,
                                                                   settings.label_studio_api_key))
        self._api: LabelStudioApi | None = None
        self._pending: WarmRequest | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, request: WarmRequest) -> None:
        """Ask for ``request`` in the background, replacing any request not started yet."""
        with self._wake:
            self._pending = request
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gsam-prewarm", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending is not None)
                request, self._pending = self._pending, None
            try:
                self.warm(request, background=True)
            except ReasonError as exc:  # LS unreachable, an image error: pre-warming is best effort
                log.warning("pre-warming project %d failed: %s", request.project, exc.reason)
            except Exception:  # noqa: BLE001 - the thread must survive anything one request raises
                log.warning("pre-warming project %d failed", request.project, exc_info=True)

    def _superseded(self) -> bool:
        with self._wake:
            return self._pending is not None

    def warm(self, request: WarmRequest, background: bool = False) -> int:
        """Encode the next tasks' images into the embedding cache; how many it encoded (cached ones
        and tasks without a usable image are skipped). ``background``: yield to predict calls and
        stop early when a newer request arrives."""
        engine = self.pipeline.engine()
        cache = getattr(getattr(engine, "segmenter", engine), "cache", None)
        budget = cache.max_bytes // 2 if cache is not None else 0
        if budget == 0:
            log.info("pre-warming skipped: the embedding cache is off (EMBEDDING_CACHE_MB=0)")
            return 0
        if self._api is None:
            self._api = self._api_factory()
        config = request.config or parse_label_config(self._api.label_config(request.project))
        if config.is_video:
            log.info("pre-warming skipped: project %d is a video project (no image embeddings)", request.project)
            return 0
        tasks = self._api.next_tasks(request.project, request.after, request.count)
        encoded, added = 0, 0
        for task in tasks:
            if background and self._superseded():
                break
            if self.owns is not None and not self.owns(task.id):
                continue  # another worker owns it and encodes it
            plan = plan_tasks(PredictRequest([{"id": task.id, "data": task.data}], config, None),
                              self.pipeline.limits)[0]
            if plan.error:
                log.info("pre-warming: task %d skipped: %s", task.id, plan.error)
                continue
            try:
                loaded = self.pipeline.loader.load(plan.image_url, task_id=task.id, defer=True)
            except ImageError as exc:  # logged by the loader; the next task may be fine
                log.info("pre-warming: task %d skipped: %s", task.id, exc.reason)
                continue
            before = cache.nbytes
            if background:
                while not self.pipeline.wait_idle(IDLE_WAIT_S):
                    if self._superseded():
                        return encoded
            if engine.warm(loaded.pixels, loaded.sha256):  # decodes only when not cached
                encoded += 1
                self.pipeline.metrics.prewarmed.inc()
                added += max(cache.nbytes - before, 0)
                if added * (encoded + 1) / encoded > budget:  # one more would pass half the cache
                    break
        log.info("pre-warming project %d: %d embeddings encoded after task %s", request.project, encoded,
                 request.after)
        return encoded
