"""The video tracks in an interactive call's context: what the annotator asks the backend to track.

LS 1.23 (OSS) calls the backend for video only when the annotator selects a region and clicks a
``<Label>`` (research/video-protocol.md §1.7, §9). ``context.result`` then holds **every**
``videorectangle`` of that label on the video, as LS serializes them::

    {"id": "…", "type": "videorectangle", "from_name": <VideoRectangle name>, "to_name": <Video name>,
     "origin": "manual" | "prediction" | …,
     "value": {"labels": ["disc"], "framesCount": 75, "duration": 3,
               "sequence": [{"frame": 1, "enabled": true, "rotation": 0, "x": 31.09, "y": 6.67,
                             "width": 21.88, "height": 33.33, "time": 0.04}, …]}}

``frame`` is the 1-based LS frame, ``x, y, width, height`` percent of the video frame, ``time``
what LS writes (``frame / frameRate``). A TextArea prompt arrives as a ``textarea`` item instead,
read by ``tasks.prompt_text``; this module ignores it.

Kept: items of type ``videorectangle`` whose ``to_name`` is the config's video and whose
``from_name`` (when present) is its VideoRectangle. Every other item is ignored. A kept item is
**skipped whole** when it is malformed (no string id, no keyframes, a keyframe with a missing or
non-finite number, a percent outside [0, 100], a frame below 1 or not an integer, an ``enabled``
that is not a boolean, two keyframes on one frame): returning such a track with a keyframe
dropped would, under its id, delete that keyframe in LS. Nothing here raises on bad content; only
the size bounds raise :class:`VideoContextTooLarge` (HTTP 413, a :class:`RequestTooLarge`).

A keyframe without ``rotation`` gets 0 and one without ``time`` gets ``frame / fps`` (LS 1.23
always sends both); ``fps`` is the config's literal ``frameRate``, else ``framesCount /
duration`` of the item, else LS's default 24. Numbers are otherwise kept exactly as sent (an int
stays an int), so a track returned with these keyframes shows them unchanged.

May import: ``labelconfig``, ``tasks`` (its request errors) and ``videotime`` of this package, and
the foundation module ``backend.tracks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backend.ls.labelconfig import LabelConfig
from backend.ls.tasks import RequestTooLarge
from backend.ls.videotime import DEFAULT_FRAME_RATE
from backend.tracks import Keyframe

#: Origins of a track the annotator drew (LS omits ``origin`` on some paths: None counts too).
MANUAL_ORIGINS = ("manual", None)
MAX_ID_CHARS = 256
_PERCENT_KEYS = ("x", "y", "width", "height")


class VideoContextTooLarge(RequestTooLarge):
    """The context holds more video tracks or keyframes than one call takes (HTTP 413)."""


@dataclass(frozen=True)
class ContextTrack:
    """One ``videorectangle`` of the context, validated.

    track_id:     its LS region id (a reply with this id replaces the region in LS).
    label:        ``value.labels[0]``, or None when it has none.
    origin:       ``origin`` as LS sent it (``"manual"`` for a drawn track), or None when absent.
    keyframes:    sorted by frame, unique frames >= 1, finite numbers, percent in [0, 100].
    frames_count: ``value.framesCount`` (LS's frame count, > 0) or None; duration: seconds (> 0) or None.
    """

    track_id: str
    label: str | None
    origin: str | None
    keyframes: tuple[Keyframe, ...]
    frames_count: int | None
    duration: float | None

    def needs_tracking(self, max_keyframes: int) -> bool:
        """True for the annotator's own track (origin ``manual`` or none) with 1..``max_keyframes``
        keyframes. A track that came from a prediction (``prediction``, ``prediction-changed``, …)
        is never re-tracked: the caller leaves it out of its reply or returns it untouched."""
        return self.origin in MANUAL_ORIGINS and 1 <= len(self.keyframes) <= max_keyframes


def _number(value: Any) -> float | int | None:
    """A finite int or float as sent (bools are not numbers here), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _frame(value: Any) -> int | None:
    """A 1-based frame number: an int >= 1 or an integral float (as its int), else None."""
    number = _number(value)
    if number is None or number != int(number) or number < 1:
        return None
    return int(number)


def _keyframe(raw: Any, fps: float) -> Keyframe | None:
    if not isinstance(raw, dict):
        return None
    frame = _frame(raw.get("frame"))
    box = [_number(raw.get(key)) for key in _PERCENT_KEYS]
    if frame is None or any(v is None or not 0.0 <= v <= 100.0 for v in box):
        return None
    rotation = _number(raw.get("rotation", 0))
    time = _number(raw["time"]) if "time" in raw else frame / fps
    enabled = raw.get("enabled", True)
    if rotation is None or time is None or not isinstance(enabled, bool):
        return None
    x, y, width, height = box
    return Keyframe(frame=frame, x=x, y=y, width=width, height=height, rotation=rotation, enabled=enabled,
                    time=time)


def _fps(config: LabelConfig, frames_count: int | None, duration: float | None) -> float:
    """The fps for a keyframe's missing ``time``: the config's literal frameRate, else the item's."""
    raw = config.video.frame_rate if config.video else None
    if raw is not None and not raw.startswith("$"):
        return config.video.fps()
    if frames_count and duration:
        return frames_count / duration
    return DEFAULT_FRAME_RATE


def _track(item: dict, config: LabelConfig) -> ContextTrack | None:
    """One item → a track, or None when it is malformed (see the module docstring)."""
    track_id, value = item.get("id"), item.get("value")
    if not isinstance(track_id, str) or not track_id or len(track_id) > MAX_ID_CHARS or not isinstance(value, dict):
        return None
    sequence = value.get("sequence")
    if not isinstance(sequence, list) or not sequence:
        return None
    frames_count = _frame(value.get("framesCount"))
    duration = _number(value.get("duration"))
    duration = float(duration) if duration is not None and duration > 0 else None
    fps = _fps(config, frames_count, duration)
    keyframes = [_keyframe(raw, fps) for raw in sequence]
    if any(k is None for k in keyframes):
        return None
    keyframes.sort(key=lambda k: k.frame)
    if any(a.frame == b.frame for a, b in zip(keyframes, keyframes[1:])):
        return None
    labels = value.get("labels")
    label = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
    origin = item.get("origin") if isinstance(item.get("origin"), str) else None
    return ContextTrack(track_id=track_id, label=label, origin=origin, keyframes=tuple(keyframes),
                        frames_count=frames_count, duration=duration)


def _ours(item: Any, config: LabelConfig) -> bool:
    """A ``videorectangle`` of the config's video (and of its VideoRectangle, when it says)."""
    if not isinstance(item, dict) or item.get("type") != "videorectangle":
        return False
    if item.get("to_name") != config.image_name:
        return False
    return item.get("from_name", config.rectangle.name) == config.rectangle.name


def parse_context_tracks(context: dict | None, config: LabelConfig, max_tracks: int = 64,
                         max_keyframes: int = 100_000) -> tuple[ContextTrack, ...]:
    """The video tracks in ``context.result``, in the order LS sent them.

    Returns ``()`` for no context, an image config, or a context without video tracks. Raises
    :class:`VideoContextTooLarge` when more than ``max_tracks`` tracks, or more than
    ``max_keyframes`` keyframes over all of them, target the video (counted before validation, so
    the bound holds for whatever was sent). Malformed tracks are skipped (module docstring).
    """
    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list) or not config.is_video or config.rectangle is None:
        return ()
    items = [item for item in results if _ours(item, config)]
    if len(items) > max_tracks:
        raise VideoContextTooLarge(
            f"the context holds {len(items)} video tracks (LS sends every track carrying the clicked label); "
            f"at most {max_tracks} are taken per call: spread the objects over more labels or tracks per task")
    total = sum(len(seq) for item in items
                if isinstance(item.get("value"), dict) and isinstance(seq := item["value"].get("sequence"), list))
    if total > max_keyframes:
        raise VideoContextTooLarge(
            f"the context's video tracks hold {total} keyframes; at most {max_keyframes} are taken per call: "
            "track fewer objects carrying the clicked label, or thin their keyframes")
    return tuple(track for item in items if (track := _track(item, config)) is not None)
