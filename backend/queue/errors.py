"""The errors of queue mode, each with the HTTP status the web layer answers.

Imports nothing (not even redis or rq), so code that only names these errors — the web layer,
the project store — imports no queue machinery in embedded mode.
"""

from __future__ import annotations


class QueueError(RuntimeError):
    """A queue-mode failure; ``http_status`` is what the web layer answers."""

    http_status = 500


class NoWorkerListening(QueueError):
    """A broadcast (pre-warming) reached no worker."""

    http_status = 503


class QueueUnavailable(QueueError):
    """Redis cannot be reached."""

    http_status = 503


class QueueTimeout(QueueError):
    """No worker answered in time."""

    http_status = 504


class JobFailed(QueueError):
    """A worker ran the job and it raised."""

    http_status = 502
