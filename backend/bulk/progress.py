"""The CLI's progress bar for a bulk run (tqdm: done + failed out of total, on stderr).

Imports tqdm lazily (only when the bar is shown) and the bulk status module.
"""

from __future__ import annotations

from backend.bulk.status import RunStatus


class ProgressBar:
    """The tqdm bar of one run, or nothing when ``enabled`` is off (web runs, tests)."""

    def __init__(self, enabled: bool, total: int, project: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=f"pre-label project {project}", dynamic_ncols=True,
                            smoothing=0.1)

    def show(self, status: RunStatus | None, note: str | None = None) -> None:
        if self.bar is None:
            return
        if status is not None:
            if self.bar.total != status.total:
                self.bar.total = status.total
            processed = status.done + status.failed
            if processed > self.bar.n:
                self.bar.update(processed - self.bar.n)
            postfix = {"done": status.done, "failed": status.failed, "remaining": status.remaining}
        else:
            postfix = {}
        if note:
            postfix["note"] = note
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["ProgressBar"]
