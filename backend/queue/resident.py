"""The worker process's resident pipeline: installed once at worker start, read by job functions.

Job functions run inside ``python -m backend worker`` (:mod:`backend.modes.worker`), which loads the
models once and installs its :class:`~backend.pipeline.predict.Pipeline` here before it serves any
job; the job functions (:mod:`backend.queue.jobs`, the bulk chunk job) read it with
:func:`resident_pipeline` instead of importing the worker. Nothing changes it per job.

Imports nothing of the backend at run time (the pipeline type only for type checkers), so the web
process, which enqueues job functions by reference, never imports torch through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.pipeline.predict import Pipeline

_pipeline: Pipeline | None = None


def install(pipeline: Pipeline) -> None:
    """Make ``pipeline`` the one job functions use. Once per process: a second, different one is refused."""
    global _pipeline
    if _pipeline is not None and _pipeline is not pipeline:
        raise RuntimeError("a resident pipeline is already installed in this process")
    _pipeline = pipeline


def resident_pipeline() -> Pipeline:
    """The worker process's pipeline (models loaded at worker start)."""
    if _pipeline is None:
        raise RuntimeError("no resident pipeline: job functions run inside `python -m backend worker`")
    return _pipeline
