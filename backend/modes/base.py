"""The interface every mode implements.

The web layer (:mod:`backend.web.app`) and the CLI (:mod:`backend.cli`) hold one :class:`Backend`,
built once by :func:`backend.modes.factory.build_backend`, and never ask which mode they are in. Tests inject a fake
:class:`Backend` instead of patching module globals.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # type names only: importing them here would pull torch-free but heavy modules early
    from backend.bulk.runs import Runs
    from backend.ls.options import PredictOptions
    from backend.ls.tasks import PredictRequest, PromptLimits
    from backend.metrics import Metrics
    from backend.modes.projects import ProjectStore

#: The LS-facing model class (``model.py``), as /health names it to Label Studio.
MODEL_CLASS = "GroundedSAM"


class Mode(enum.StrEnum):
    """Where the models run: in this process (``embedded``) or in RQ workers (``queue``)."""

    EMBEDDED = "embedded"
    QUEUE = "queue"


class Backend(Protocol):
    """A deployment as the web layer and the CLI see it.

    ``predict`` answers exactly one prediction per task, in task order (a task that fails gets an
    empty one); it raises :class:`backend.ls.tasks.RequestError` for a request no task can be
    served for, and :class:`backend.queue.client.QueueError` subclasses in queue mode.
    """

    mode: Mode
    model_version: str
    limits: PromptLimits
    metrics: Metrics
    runs: Runs
    projects: ProjectStore  # per-project options and remembered prompts (memory | Redis)

    def predict(self, request: PredictRequest) -> list[dict]: ...

    def served(self) -> dict[str, list[str]]:
        """Engine -> the model versions it serves now (embedded: ENGINES' pipelines; queue: the live workers)."""
        ...

    def check_choice(self, options: PredictOptions) -> None:
        """``/setup``: raise OptionsError (400) when the project's ``engine`` / ``model_version``
        cannot be served by this deployment (saying what to do)."""
        ...

    def engine_state(self, options: PredictOptions) -> dict:
        """``{"engine", "engine_served", "engines"}`` for a project with ``options``."""
        ...

    def versions(self) -> list[str]:
        """The model versions this deployment serves (``GET /versions``), its own first."""
        ...

    def health(self) -> dict:
        """The /health body: ``status`` (UP or DEGRADED), ``model_class``, ``model_version``, ``mode``, ..."""
        ...

    def preload(self) -> None:
        """Start loading the models in the background, if this process runs them."""
        ...

    def prewarm(self, project: int, request: PredictRequest) -> None:
        """After a /predict of ``project``: start encoding its next tasks' embeddings, where this
        mode can (returns at once; a no-op where it cannot)."""
        ...

    def warm(self, project: int, count: int, after: int | None = None, options: PredictOptions = ...) -> dict:
        """Encode ``project``'s first ``count`` tasks after ``after`` with the engine ``options``
        choose (``POST /warm``): the answer's
        body, ``{"encoded": n}`` when done here and now (embedded), ``{"workers": n}`` when ``n``
        workers took the request and encode in the background (queue). Raises ValueError for a
        count out of bounds, a QueueError where the mode cannot."""
        ...
