"""What an admin asks of a bulk run, validated in one place for ``POST /prelabel`` and the CLI.

Holds the chunk bounds and default (tasks per job), so the HTTP route, the CLI and the runners
cannot disagree on them. Imports only :mod:`backend.ls.options` (the project's options type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backend.ls.options import PredictOptions

#: Tasks per job: several engine batches, so image loading overlaps the GPU within a job.
DEFAULT_CHUNK = 64
MIN_CHUNK, MAX_CHUNK = 1, 256
#: At most this many task ids in a run limited to a subset (``task_ids``): "Retrieve predictions"
#: defers at most a request's tasks (see :mod:`backend.modes.retrieve`).
MAX_RUN_TASK_IDS = 100_000


class PrelabelError(ValueError):
    """The run cannot start as asked (bad project, config, prompt, chunk or model version); the
    message says what to fix (an HTTP 400 for ``POST /prelabel``, exit status 2 for the CLI)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunRequest:
    """A bulk run as asked: ``project`` (LS project id), ``prompt`` (None: the project's labels),
    ``chunk`` (tasks per job), ``redo`` (also tasks that already have a prediction of the version),
    ``model_version`` (None: the version this deployment serves), ``options`` (the project's
    ``extra_params``: the web layer and the CLI look them up, see :mod:`backend.modes.projects`),
    ``task_ids`` (None: every task of the project; else only these, still skipping those that have a
    prediction of the version unless ``redo``). Raises :class:`PrelabelError` on construction when a
    field is out of range."""

    project: int
    prompt: str | None = None
    chunk: int = DEFAULT_CHUNK
    redo: bool = False
    model_version: str | None = None
    options: PredictOptions = PredictOptions()
    task_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.project) or self.project < 1:
            raise PrelabelError("'project' must be the Label Studio project id (a positive integer)")
        if not _is_int(self.chunk) or not MIN_CHUNK <= self.chunk <= MAX_CHUNK:
            raise PrelabelError(f"'chunk' must be an integer in [{MIN_CHUNK}, {MAX_CHUNK}] (tasks per job)")
        if (self.prompt is not None and not isinstance(self.prompt, str)) or not isinstance(self.redo, bool):
            raise PrelabelError("'prompt' must be a string and 'redo' a boolean")
        version = self.model_version
        if version is not None and (not isinstance(version, str) or not version.strip()):
            raise PrelabelError("'model_version' must be a non-empty string (default: the served version)")
        if not isinstance(self.options, PredictOptions):
            raise PrelabelError("'options' must be PredictOptions (a project's extra_params)")
        if self.task_ids is not None:
            ids = self.task_ids
            if not isinstance(ids, (tuple, list)) or not 1 <= len(ids) <= MAX_RUN_TASK_IDS \
                    or not all(_is_int(i) and i >= 1 for i in ids):
                raise PrelabelError(f"'task_ids' must be 1 to {MAX_RUN_TASK_IDS} task ids (positive integers)")
            object.__setattr__(self, "task_ids", tuple(dict.fromkeys(ids)))  # in order, once each
        object.__setattr__(self, "prompt", self.prompt.strip() if self.prompt and self.prompt.strip() else None)
        object.__setattr__(self, "model_version", version.strip() if version else None)

    @classmethod
    def from_json(cls, body: dict) -> "RunRequest":
        """From a ``POST /prelabel`` body: ``project`` (required), ``prompt``, ``chunk``, ``redo``,
        ``model_version``, ``task_ids``."""
        return cls(project=body.get("project"), prompt=body.get("prompt"), chunk=body.get("chunk", DEFAULT_CHUNK),
                   redo=body.get("redo", False), model_version=body.get("model_version"),
                   task_ids=body.get("task_ids"))
