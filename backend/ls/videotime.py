"""Label Studio's video clock: LS frame numbers ↔ seconds, as LS 1.23's editor computes them.

LS numbers video frames from 1. From 1.23.0 (the feature flag
``fflag_fix_front_optic_1608_improve_video_frame_seek_precision_short`` is forced on), LS frame
*f* is the picture the browser shows at time ``(f - 1) / fps`` (it seeks to that time plus
:data:`BROWSER_TIME_PRECISION`), and a video has ``round(duration * fps)`` frames. ``fps`` is the
label config's ``<Video frameRate>``, not the file's: a file whose real rate differs is mapped
through time, never by counting decoded frames. LS 1.20–1.22 differ (they seek to ``f / fps``)
unless that flag is set in LS's environment (docs/video.md, "Frame numbers").

LS writes ``time = frame / fps`` on every keyframe it saves (its exporter reads it), so
:func:`keyframe_time` is that value, not the time the frame is shown at.

Pure arithmetic; imports nothing of the backend.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

#: LS seeks this much past a frame's start time, so the browser lands inside the frame.
BROWSER_TIME_PRECISION = 0.002
#: ``<Video frameRate>``'s default in LS.
DEFAULT_FRAME_RATE = 24.0


def frame_rate(raw: Any, task_data: Mapping[str, Any] | None = None) -> float:
    """The config's ``frameRate`` attribute as LS reads it: a number (string or not), or
    ``$field`` read from the task's data; a value below 1 is inverted (LS treats ``0.04`` as 25);
    anything that is not a positive finite number is LS's default, 24."""
    if isinstance(raw, str) and raw.startswith("$"):
        raw = (task_data or {}).get(raw[1:]) if isinstance(task_data, Mapping) else None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return DEFAULT_FRAME_RATE
    if not math.isfinite(value) or value <= 0:
        return DEFAULT_FRAME_RATE
    return 1.0 / value if value < 1 else value


def frames_count(duration: float, fps: float) -> int:
    """LS 1.23's frame count of a ``duration``-second video at ``fps``: ``round(duration * fps)``
    (its ``framesCount``)."""
    return max(0, int(round(duration * fps)))


def frame_start(frame: int, fps: float) -> float:
    """The time (seconds from the video's start) at which LS frame ``frame`` (1-based) begins."""
    return (frame - 1) / fps


def keyframe_time(frame: int, fps: float) -> float:
    """The ``time`` LS writes on a keyframe of LS frame ``frame``: ``frame / fps``."""
    return frame / fps


def frame_at(time: float, fps: float) -> int:
    """The LS frame (1-based) shown at ``time`` seconds: the last frame that begins at or before
    it (within :data:`BROWSER_TIME_PRECISION`)."""
    return max(1, int(math.floor(time * fps + BROWSER_TIME_PRECISION * fps)) + 1)
