"""Per-project settings: the options an LS admin typed as ``extra_params`` (sent to ``/setup``) and
the prompt an annotator last submitted in the project (the *remembered prompt*).

- :class:`ProjectSettings`: what is stored for one project; :attr:`ProjectSettings.default_prompt` is
  the prompt for tasks that arrive without one (the remembered prompt, else ``extra_params.prompt``;
  None: the config's labels stay the prompt).
- :class:`MemoryProjectStore` (embedded mode: this process only, lost on restart until LS calls
  ``/setup`` again) and :class:`RedisProjectStore` (queue mode: every web process and CLI sees the
  same settings). Both forget a project :data:`PROJECT_TTL_S` after its last use, and both ignore
  remembering when ``REMEMBER_PROMPT=false`` (a prompt remembered earlier is then not used either).
- :func:`project_id`, :func:`apply_project`, :func:`for_run`: how the web layer and the CLI read
  the LS project id and apply a project's settings to a predict request or a bulk run.

Redis key (name in :mod:`backend.queue.keys`): ``gsam:project:<id>``, a hash with ``options`` (the
options' JSON) and ``prompt`` (the remembered prompt), expiring :data:`PROJECT_TTL_S` after its
last read or write. Nothing read back from Redis is trusted: options are validated again.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Protocol

from backend.bulk.request import RunRequest
from backend.ls.options import MAX_PROMPT_CHARS, OptionsError, PredictOptions
from backend.ls.tasks import PredictRequest, PromptLimits, RequestError, prompt_text, split_prompt
from backend.queue import keys
from backend.queue.errors import QueueUnavailable

log = logging.getLogger(__name__)

#: A project's settings are forgotten this long after their last use (LS sends /setup again anyway).
PROJECT_TTL_S = 90 * 24 * 3600
#: At most this many projects in the embedded store (least recently used go first).
MAX_MEMORY_PROJECTS = 10_000
#: Project ids are below this (18 digits; also what the uid pattern below accepts).
PROJECT_ID_LIMIT = 10**18
#: LS's project uid is ``<id>.<created timestamp>`` (label-studio ml/api_connector.py); plain ids are fine too.
_PROJECT_UID = re.compile(r"([1-9][0-9]{0,17})(?:\.[0-9]{1,20})?")


@dataclass(frozen=True)
class ProjectSettings:
    """One project's stored settings. ``remembered_prompt``: the last prompt an annotator submitted
    (None: none, or remembering is off)."""

    options: PredictOptions = PredictOptions()
    remembered_prompt: str | None = None

    @property
    def default_prompt(self) -> str | None:
        """The prompt for tasks without one: the remembered prompt, else ``extra_params.prompt``."""
        return self.remembered_prompt or self.options.prompt

    def to_json(self, project: int) -> dict:
        """The ``GET /projects/<id>/settings`` body."""
        return {"project": project, "options": self.options.to_json(), "remembered_prompt": self.remembered_prompt,
                "default_prompt": self.default_prompt}


class ProjectStore(Protocol):
    """Where a deployment keeps its projects' settings. ``remember``: whether prompts are remembered."""

    remember: bool

    def get(self, project: int) -> ProjectSettings | None:
        """The project's settings, None when nothing is stored (never set, or expired)."""
        ...

    def set_options(self, project: int, options: PredictOptions) -> ProjectSettings:
        """Replace the project's options (``/setup``). A new ``options.prompt`` (set and different
        from the stored one) replaces the remembered prompt: the admin chose it explicitly."""
        ...

    def remember_prompt(self, project: int, prompt: str) -> None:
        """Remember ``prompt`` (already validated) as the project's default; no-op when remembering is off."""
        ...


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"a remembered prompt is a non-blank string of at most {MAX_PROMPT_CHARS} characters")
    return prompt.strip()


class MemoryProjectStore:
    """Embedded mode: settings in this process (LRU-bounded, expiring like the Redis keys)."""

    def __init__(self, remember: bool = True, max_projects: int = MAX_MEMORY_PROJECTS, ttl_s: float = PROJECT_TTL_S):
        self.remember = remember
        self.max_projects = max_projects
        self.ttl_s = ttl_s
        self._items: OrderedDict[int, tuple[ProjectSettings, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _current(self, project: int) -> ProjectSettings | None:
        """Under the lock: the live entry (an expired one is dropped), marked used."""
        item = self._items.get(project)
        if item is None:
            return None
        if time.monotonic() - item[1] > self.ttl_s:
            del self._items[project]
            return None
        self._put(project, item[0])
        return item[0]

    def _put(self, project: int, settings: ProjectSettings) -> None:
        self._items[project] = (settings, time.monotonic())
        self._items.move_to_end(project)
        while len(self._items) > self.max_projects:
            self._items.popitem(last=False)

    def get(self, project: int) -> ProjectSettings | None:
        with self._lock:
            current = self._current(project)
        if current is not None and not self.remember:
            return replace(current, remembered_prompt=None)
        return current

    def set_options(self, project: int, options: PredictOptions) -> ProjectSettings:
        with self._lock:
            old = self._current(project) or ProjectSettings()
            remembered = old.remembered_prompt
            if options.prompt is not None and options.prompt != old.options.prompt:
                remembered = None
            self._put(project, ProjectSettings(options, remembered))
        return self.get(project)

    def remember_prompt(self, project: int, prompt: str) -> None:
        if not self.remember:
            return
        prompt = _check_prompt(prompt)
        with self._lock:
            old = self._current(project) or ProjectSettings()
            self._put(project, replace(old, remembered_prompt=prompt))


class RedisProjectStore:
    """Queue mode: settings in Redis (``gsam:project:<id>``), shared by every process of the deployment.
    Redis being unreachable is a :class:`~backend.queue.client.QueueUnavailable` (HTTP 503)."""

    def __init__(self, connection, remember: bool = True, ttl_s: int = PROJECT_TTL_S):
        self.connection = connection
        self.remember = remember
        self.ttl_s = ttl_s

    def _redis(self, what: str, action):
        import redis  # queue mode only: embedded installs need no redis-py

        try:
            return action()
        except redis.RedisError as exc:
            raise QueueUnavailable(f"Redis is unreachable while {what} ({type(exc).__name__}): "
                                   "check REDIS_URL") from None

    def get(self, project: int) -> ProjectSettings | None:
        key = keys.project_key(project)

        def read():
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hmget(key, "options", "prompt")
                pipe.expire(key, self.ttl_s)  # refreshed on use; a no-op for a missing key
                return pipe.execute()[0]

        raw_options, raw_prompt = self._redis(f"reading project {project}'s settings", read)
        if raw_options is None and raw_prompt is None:
            return None
        remembered = raw_prompt.decode("utf-8", "replace") if isinstance(raw_prompt, bytes) else raw_prompt
        try:
            remembered = _check_prompt(remembered) if remembered is not None and self.remember else None
        except ValueError:
            log.warning("project %d: ignoring an unusable remembered prompt in Redis", project)
            remembered = None
        return ProjectSettings(_stored_options(project, raw_options), remembered)

    def set_options(self, project: int, options: PredictOptions) -> ProjectSettings:
        key = keys.project_key(project)

        def update(pipe) -> None:  # WATCHed: a concurrent /setup makes redis-py run it again
            old = _stored_options(project, pipe.hget(key, "options"))
            pipe.multi()
            pipe.hset(key, "options", json.dumps(options.to_json()))
            if options.prompt is not None and options.prompt != old.prompt:
                pipe.hdel(key, "prompt")
            pipe.expire(key, self.ttl_s)

        self._redis(f"storing project {project}'s options", lambda: self.connection.transaction(update, key))
        return self.get(project) or ProjectSettings(options)

    def remember_prompt(self, project: int, prompt: str) -> None:
        if not self.remember:
            return
        prompt = _check_prompt(prompt)
        key = keys.project_key(project)

        def write() -> None:
            with self.connection.pipeline(transaction=True) as pipe:
                pipe.hset(key, "prompt", prompt)
                pipe.expire(key, self.ttl_s)
                pipe.execute()

        self._redis(f"remembering project {project}'s prompt", write)


def _stored_options(project: int, raw: Any) -> PredictOptions:
    """Options read back from Redis, validated again (unusable ones are ignored with a warning)."""
    if raw is None:
        return PredictOptions()
    try:
        return PredictOptions.from_json(json.loads(raw))
    except (ValueError, OptionsError) as exc:
        log.warning("project %d: ignoring unusable stored options (%s)", project, type(exc).__name__)
        return PredictOptions()


def project_id(value: Any) -> int | None:
    """The LS project id of a ``/setup`` or ``/predict`` body's ``project``: ``"1.1795371121"`` (LS's
    ``<id>.<created>`` uid) or ``1`` → 1; None when absent. Raises RequestError (400) otherwise."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < PROJECT_ID_LIMIT:
        return value
    match = _PROJECT_UID.fullmatch(value.strip()) if isinstance(value, str) and len(value) <= 64 else None
    if match is None:
        raise RequestError("'project' must be Label Studio's project id, e.g. \"12\" or \"12.1700000000\"")
    return int(match.group(1))


def usable_prompt(prompt: str | None, limits: PromptLimits) -> bool:
    """True when ``prompt`` has phrases within ``limits`` (a prompt stored under other limits may not)."""
    if not prompt:
        return False
    try:
        return bool(split_prompt(prompt, limits))
    except RequestError:
        return False


def apply_project(store: ProjectStore, project: int, request: PredictRequest, limits: PromptLimits) -> PredictRequest:
    """A ``/predict`` request with its project's settings applied.

    An interactive call whose context has prompt text makes that text the project's remembered
    prompt (when it is a usable prompt). The project's options go into ``request.options``; a call
    without context (LS's task-open and "Retrieve predictions" calls) gets the default prompt. An
    interactive call with an empty context keeps asking for nothing.
    """
    typed = prompt_text(request.context, request.config)
    if typed is not None and store.remember and usable_prompt(typed, limits):
        store.remember_prompt(project, typed)
        log.debug("project %d: prompt remembered (%d characters)", project, len(typed))
    stored = store.get(project)
    if stored is None:
        return request
    request = replace(request, options=stored.options)
    default = stored.default_prompt
    if request.context is None and request.prompt is None and usable_prompt(default, limits):
        request = replace(request, prompt=default)
    return request


def for_run(store: ProjectStore, run: RunRequest) -> RunRequest:
    """A bulk run with its project's options, and the default prompt when the run names none."""
    stored = store.get(run.project)
    if stored is None:
        return run
    return replace(run, options=stored.options, prompt=run.prompt or stored.default_prompt)


__all__ = ["MAX_MEMORY_PROJECTS", "PROJECT_TTL_S", "MemoryProjectStore", "ProjectSettings", "ProjectStore",
           "RedisProjectStore", "apply_project", "for_run", "project_id", "usable_prompt"]
