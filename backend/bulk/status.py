"""A bulk run's state and progress as every reader sees it: :class:`RunState`, :class:`RunStatus`.

The stores (:mod:`backend.bulk.runstore`) compute a :class:`RunStatus` from their sets; the web
layer answers ``GET /jobs/<id>`` with :meth:`RunStatus.to_json`. Imports nothing of the backend.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

#: How many failed tasks (with their reasons) a status lists.
FAILURES_SHOWN = 100


class RunState(enum.StrEnum):
    """Where a run is. ``planning``: its tasks are being listed; ``running``; ``done``; ``cancelled``;
    ``failed``: the run itself could not go on (e.g. LS was unreachable while planning; ``error``
    says why). A ``str`` enum: its values are what JSON bodies and the Redis hash hold."""

    PLANNING = "planning"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """Planning or running: the run can still change (and be cancelled)."""
        return self in (RunState.PLANNING, RunState.RUNNING)


FINAL = frozenset({RunState.DONE, RunState.CANCELLED, RunState.FAILED})


@dataclass
class RunStatus:
    """A run's progress. ``done`` counts tasks written back (or found labeled meanwhile), ``failed``
    tasks with a reason (``failures``: the first :data:`FAILURES_SHOWN`), ``skipped`` the project's
    tasks the planner left out because they already had a prediction of this model version."""

    id: str
    project: int
    status: RunState
    total: int
    done: int
    failed: int
    model_version: str
    skipped: int = 0
    created: float = 0.0
    updated: float = 0.0
    failures: dict[int, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done - self.failed)

    @property
    def images_per_second(self) -> float:
        """Tasks processed (done + failed) per second since the run was created."""
        processed = self.done + self.failed
        end = self.updated if self.status in FINAL else max(self.updated, time.time())
        elapsed = end - self.created
        return processed / elapsed if processed and elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if self.status == RunState.PLANNING:
            return None
        if self.remaining == 0:
            return 0.0
        if self.status != RunState.RUNNING:
            return None
        rate = self.images_per_second
        return self.remaining / rate if rate > 0 else None

    def to_json(self) -> dict:
        ips, eta = self.images_per_second, self.eta_seconds
        return {"id": self.id, "project": self.project, "status": self.status.value, "total": self.total,
                "done": self.done, "failed": self.failed, "remaining": self.remaining, "skipped": self.skipped,
                "images_per_second": round(ips, 3), "eta_seconds": None if eta is None else round(eta, 1),
                "failures": {str(k): v for k, v in self.failures.items()}, "model_version": self.model_version,
                "created": self.created, "updated": self.updated, "error": self.error}


__all__ = ["FAILURES_SHOWN", "FINAL", "RunState", "RunStatus"]
