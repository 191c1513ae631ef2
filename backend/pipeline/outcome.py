"""What the pipeline answers per task, image or video (a module of its own so both halves use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskOutcome:
    """One task's answer: its prediction, and why it is empty when the task failed (else None)."""

    prediction: dict
    error: str | None = None
