"""Tracks → Label Studio ``videorectangle`` prediction JSON (research/video-protocol.md §1.2–1.6).

Input: :class:`backend.tracks.VideoTracks` (XYXY pixel boxes of the decoded frame, per LS frame,
1-based). Output: one ``videorectangle`` result per track, ``from_name`` the config's
``<VideoRectangle>``, ``to_name`` its ``<Video>``, ``value.labels`` the track's label, and a
``sequence`` of **keyframes only**, each with all eight keys LS's editor and its exporter read
(``frame, x, y, width, height, rotation, enabled, time``; ``time = frame / fps`` as LS writes it).
No ``origin`` key, as the image regions (``regions.py``): LS marks what a backend returns itself.

How LS shows a sequence (§1.4): at frame t, the nearest keyframe at or before t decides: none, or
one with ``enabled: false`` that is not at t itself, means hidden; otherwise the box is that
keyframe interpolated linearly to the next one (held after the last). So:

- a *run* is a stretch of visible listed frames; it ends at a frame whose box is None (not
  visible), at the end of the track, or at an annotator's keyframe with ``enabled: false``. Frames
  not listed at all (untracked) do not end a run: LS interpolates across them, which is what a
  tracker that skips frames wants. Each run's first and last frames are keyframes; its last is
  ``enabled: false``, so the track's final keyframe always is (also when the object is visible
  through the video's last frame: a disabled keyframe is still drawn at its own frame, so the
  picture is the same, and the SDK export stops there too);
- inside a run, :func:`thin_keyframes` keeps only the frames LS's interpolation needs.

The annotator's keyframes (``Track.manual``) are written exactly as given and are anchors of the
thinning; a tracked box on one of their frames is dropped. Their ``enabled`` flags are theirs: an
``enabled: true`` manual keyframe right before frames the tracker lost keeps the box on screen
across them (the annotator's word wins). Manual keyframes are kept even beyond ``frames_count``
(LS computed them against the browser's count); tracked boxes outside ``1..frames_count`` are
dropped. A tracked box with a non-finite coordinate, or empty once clipped to the frame, counts
as not visible.

May import: ``labelconfig``, ``geometry`` and ``videotime`` of this package, and the foundation
module ``backend.tracks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from backend.ls.geometry import PercentRect
from backend.ls.labelconfig import LabelConfig
from backend.ls.videotime import keyframe_time
from backend.tracks import Keyframe, Track, TrackedBox, VideoTracks

Vec = tuple[float, float, float, float]  # x, y, width, height in LS percent


class VideoResultError(ValueError):
    """Tracks cannot be written as LS results as asked (a bad size, rate or tolerance, or an image
    config); the message says which argument to fix."""


@dataclass(frozen=True)
class _Point:
    """One listed frame of a track: a tracked box (``box`` its index in the input) or a manual keyframe."""

    frame: int
    vec: Vec | None  # None: not visible
    box: int | None = None
    manual: Keyframe | None = None


def _check(width: int, height: int, tolerance: float) -> None:
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise VideoResultError(f"the video frame size must be positive integer pixels, got {width!r} x {height!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise VideoResultError(f"the keyframe tolerance must be a finite number of percent >= 0, got {tolerance!r}")


def percent_box(box: Sequence[float] | None, width: int, height: int) -> Vec | None:
    """An XYXY pixel box of a ``width x height`` frame → LS percent ``(x, y, width, height)``, clipped
    to the frame; None for no box, a non-finite coordinate, or nothing left inside the frame."""
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    rect = PercentRect.from_pixel_box((x0, y0, x1, y1), width, height)
    return tuple(min(max(v, 0.0), 100.0) for v in (rect.x, rect.y, rect.width, rect.height))  # type: ignore


def _farthest(run: list[_Point], start: int, stop: int, tolerance: float) -> int:
    """The farthest index ``b`` in ``(start, stop]`` such that the straight line from ``run[start]``
    to ``run[b]`` (over frame numbers) is within ``tolerance`` of every point between them.

    The slopes from ``start`` that pass within ``tolerance`` of each point between form an interval
    per coordinate; their intersection (the wedge) only shrinks as ``b`` moves on, so one forward
    scan finds ``b`` and stops when the wedge is empty. ``start + 1`` always qualifies."""
    f0, v0 = run[start].frame, run[start].vec
    low, high = [-math.inf] * 4, [math.inf] * 4
    best = start + 1
    for b in range(start + 1, stop + 1):
        span = run[b].frame - f0
        slopes = [(run[b].vec[k] - v0[k]) / span for k in range(4)]
        if all(low[k] <= slopes[k] <= high[k] for k in range(4)):
            best = b
        if b == stop:
            break
        for k in range(4):
            low[k] = max(low[k], (run[b].vec[k] - tolerance - v0[k]) / span)
            high[k] = min(high[k], (run[b].vec[k] + tolerance - v0[k]) / span)
        if any(low[k] > high[k] for k in range(4)):
            break
    return best


def _thin_run(run: list[_Point], tolerance: float) -> list[int]:
    """Indices of ``run`` to keep: its first and last point, every manual keyframe, and greedily
    the farthest-reaching point between those anchors (:func:`_farthest`)."""
    anchors = [0] + [i for i, p in enumerate(run) if p.manual is not None and 0 < i < len(run) - 1] + [len(run) - 1]
    kept = [0]
    for start, stop in zip(anchors, anchors[1:]):
        at = start
        while at < stop:
            at = _farthest(run, at, stop, tolerance)
            kept.append(at)
    return sorted(set(kept))


def _runs(points: list[_Point]) -> list[list[_Point]]:
    """Split listed frames into runs (module docstring): at a not-visible frame, and after a manual
    keyframe with ``enabled: false``."""
    runs, current = [], []
    for point in points:
        if point.vec is None:
            if current:
                runs.append(current)
            current = []
            continue
        current.append(point)
        if point.manual is not None and not point.manual.enabled:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _keyframes(boxes: Sequence[TrackedBox], manual: Sequence[Keyframe], width: int, height: int,
               tolerance: float, frames_count: int | None) -> list[tuple[_Point, bool]]:
    """The kept points of a track, sorted by frame, each with its ``enabled`` flag."""
    manual_frames = {k.frame for k in manual}
    points: dict[int, _Point] = {}
    for index, item in enumerate(boxes):
        if item.frame < 1 or (frames_count is not None and item.frame > frames_count):
            continue
        if item.frame in manual_frames or item.frame in points:  # first listed wins on a repeated frame
            continue
        points[item.frame] = _Point(item.frame, percent_box(item.box, width, height), box=index)
    for key in manual:
        points[key.frame] = _Point(key.frame, (key.x, key.y, key.width, key.height), manual=key)
    kept = []
    for run in _runs([points[frame] for frame in sorted(points)]):
        indices = _thin_run(run, tolerance)
        for i in indices:
            point = run[i]
            enabled = point.manual.enabled if point.manual is not None else i != len(run) - 1
            kept.append((point, enabled))
    return kept


def thin_keyframes(boxes: Sequence[TrackedBox], width: int, height: int, tolerance: float) -> list[TrackedBox]:
    """The tracked boxes to write as keyframes, in frame order (visible ones only).

    ``boxes``: one track's tracked frames (XYXY pixels of a ``width x height`` frame; ``box`` None
    where not visible), sorted by frame, unique (a repeated frame: the first wins). Keeps the
    first and last visible frame of every run (module docstring: a run ends at a not-visible frame
    or at the end), and between them the fewest frames a greedy pass finds such that LS's linear
    interpolation (over frame numbers) between consecutive kept frames stays within ``tolerance``
    percent (of the width for ``x``/``width``, of the height for ``y``/``height``, each
    coordinate on its own, after clipping to the frame) of every listed visible box. Frames not
    listed are not checked.

    Greedy, farthest reach first (:func:`_farthest`): from each kept frame, the farthest next frame
    whose chord fits, found by one forward scan that keeps the intersection of the feasible slope
    intervals. Cost: O(n) per kept frame in the worst case (O(n·k) for n frames, k keyframes), about
    O(n) in practice since the scan stops once the wedge closes. Not always the minimum (an exact
    minimum needs O(n²) chord checks) but within a few keyframes of it; a straight motion collapses
    to its two ends.
    """
    _check(width, height, tolerance)
    return [boxes[point.box] for point, _ in _keyframes(boxes, (), width, height, tolerance, None)]


def video_track_result(track: Track, config: LabelConfig, width: int, height: int, fps: float,
                       frames_count: int, duration: float, tolerance: float) -> dict:
    """One ``videorectangle`` result for ``track`` (module docstring for the flags and the thinning).

    ``width x height``: the decoded frame the boxes are in; ``fps``: the config's frame rate (``time``
    = frame / fps); ``frames_count``, ``duration``: LS's ``framesCount`` and the video's seconds,
    written into ``value``. The ``sequence`` is sorted by frame, unique, and empty when the track
    has no visible frame in ``1..frames_count`` and no manual keyframe. ``value.labels`` is
    ``[track.label]`` (``[]`` for an empty label: LS then shows the track unlabelled).
    """
    _check(width, height, tolerance)
    if not config.is_video or config.rectangle is None:
        raise VideoResultError("video tracks need a video label config (<Video> with <VideoRectangle> and <Labels>)")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise VideoResultError(f"the frame rate must be a positive number of frames per second, got {fps!r}")
    if not (isinstance(frames_count, int) and frames_count >= 1):
        raise VideoResultError(f"frames_count must be LS's frame count (an integer >= 1), got {frames_count!r}")
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration >= 0):
        raise VideoResultError(f"duration must be the video's length in seconds (>= 0), got {duration!r}")
    sequence = []
    for point, enabled in _keyframes(track.boxes, track.manual, width, height, tolerance, frames_count):
        if point.manual is not None:
            sequence.append(point.manual.to_json())
            continue
        x, y, w, h = point.vec
        sequence.append(Keyframe(frame=point.frame, x=x, y=y, width=w, height=h, rotation=0, enabled=enabled,
                                 time=keyframe_time(point.frame, fps)).to_json())
    return {
        "id": track.track_id, "from_name": config.rectangle.name, "to_name": config.rectangle.to_name,
        "type": "videorectangle", "score": float(track.score),
        "value": {"labels": [track.label] if track.label else [], "framesCount": frames_count,
                  "duration": float(duration), "sequence": sequence},
    }


def build_video_prediction(tracks: VideoTracks, config: LabelConfig, model_version: str, tolerance: float) -> dict:
    """One LS prediction for one video task: a ``videorectangle`` per track that has at least one
    keyframe, ``score`` the mean of their scores (0.0 when none), as ``regions.build_prediction``."""
    results, scores = [], []
    for track in tracks.tracks:
        result = video_track_result(track, config, tracks.width, tracks.height, tracks.fps, tracks.frames_count,
                                    tracks.duration, tolerance)
        if result["value"]["sequence"]:
            results.append(result)
            scores.append(float(track.score))
    return {"result": results, "score": float(np.mean(scores)) if scores else 0.0, "model_version": model_version}
