"""The one error shape shared by the modules that talk to the outside (images, LS auth, LS API).

Foundation module: imports nothing of the backend. ``ImageError`` lives here, not in ``images``,
because the engine raises it too (an image too thin for the models) and must not import ``images``.
"""

from __future__ import annotations


class ReasonError(Exception):
    """An error whose ``reason`` is one sentence saying what failed and, where it helps, what to fix.

    It never contains credentials, query strings or response bodies, so it can be logged and
    returned in an API response as is.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ImageError(ReasonError):
    """An image could not be resolved, downloaded or decoded, or the models cannot take it
    (``reason``: see ReasonError); it fails its own task only."""


class ModelLoadError(ReasonError):
    """The models could not be loaded: ``reason`` names the setting, the value and what to fix
    (a missing directory, a checkpoint of a family the setting does not take, a hub id that cannot
    be downloaded, too little memory). The backend reports it in /health and answers /predict with
    503 instead of failing every request; a queue worker exits non-zero with it."""

    def __init__(self, setting: str, value: str, problem: str, fix: str) -> None:
        super().__init__(f"{setting}={value!r}: {problem}; {fix}")
        self.setting, self.value = setting, value


class EngineNotServed(ReasonError):
    """A project's engine (``extra_params.engine`` / ``model_version``) is not served right now: no
    live worker of it (queue mode) or not in ENGINES (embedded); ``reason`` names the engine and how
    to start it. The web layer answers 503."""
