"""The one place that chooses the mode: ``REDIS_URL`` set = queue mode, else embedded."""

from __future__ import annotations

from backend.modes.base import Backend
from backend.pipeline.predict import Pipeline
from backend.settings import Settings


def build_backend(settings: Settings, pipeline: Pipeline | None = None) -> Backend:
    """Queue mode when ``REDIS_URL`` is set, else embedded (``pipeline``: an existing one to share).

    Queue mode never imports torch nor builds a pipeline; embedded mode loads the models on first
    use (or when the caller asks :meth:`Backend.preload`). Each mode brings its project store
    (:mod:`backend.modes.projects`): Redis in queue mode, this process's memory embedded."""
    if settings.redis_url:
        from backend.modes.queued import QueueBackend  # lazy: each mode imports only what it needs

        return QueueBackend(settings)
    from backend.modes.embedded import EmbeddedBackend

    return EmbeddedBackend(settings, pipeline)
