"""Video tracking runs: decoded frames → tracks, for a text prompt or for an annotator's boxes.

Two runs over one video (:class:`~backend.images.video.VideoSource`), both streaming: frames are
decoded, given to the tracker and dropped; only each object's box per frame is kept.

- :func:`track_text` (a text prompt, or the labels): the detector looks at the first frame and
  then every ``detect_every`` frames. A detection whose mask overlaps a live track's mask on that
  frame (IoU ≥ ``match_iou``) continues it; any other starts a new track there, which is also
  followed backward (a second, reversed session) to where it first appears, at most
  ``track_frames`` frames back.
- :func:`track_boxes` (an annotator's tracks in an interactive context): each is prompted with
  its last keyframe's box and followed forward (and/or backward from its first keyframe) for at
  most ``track_frames`` frames.

Every frame is checked against a :class:`Deadline`: a run that runs out of time stops and
returns what it has (``truncated`` says so). Boxes are XYXY pixels of the decoded frame; frames
are LS frame numbers (see :mod:`backend.ls.videotime`). May import: ls, images, the foundation,
and the engine's tracker types only through the objects it is given (no torch import here).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from backend.ls.geometry import PercentRect
from backend.ls.regions import region_id
from backend.ls.selection import Selected
from backend.ls.videocontext import ContextTrack
from backend.results import Detections, ImageResult
from backend.tracks import Track, TrackedBox

log = logging.getLogger(__name__)

#: A track is visible on a frame when the tracker's object score is above this (sigmoid) and its
#: mask is not empty.
VISIBLE_SCORE = 0.5
#: A backward run stops once every object it follows has been invisible this many frames in a row.
LOST_PATIENCE = 3


class Deadline:
    """Wall-clock budget of one predict call (``seconds`` None: none, as for bulk runs)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def reason(self) -> str:
        return f"stopped at VIDEO_DEADLINE={self.seconds:g} s; the rest of the video is not tracked"


@dataclass(frozen=True)
class TrackParams:
    """How a run tracks (frames are LS frames at the config's frame rate)."""

    detect_every: int  # ≥ 1
    track_frames: int  # ≥ 1: how far a drawn box (or a new object, backward) is followed
    match_iou: float = 0.5
    max_objects: int = 50
    direction: str = "forward"  # drawn boxes: forward, backward or both


@dataclass
class TrackBuilder:
    """A track being built: its label, detector scores, tracker scores and boxes per frame (used by
    every run, :mod:`backend.pipeline.videotrack_sam3` too)."""

    track_id: str
    label: str
    detections: list[float] = field(default_factory=list)
    visibility: list[float] = field(default_factory=list)
    boxes: dict[int, tuple[float, float, float, float] | None] = field(default_factory=dict)

    def record(self, frame: int, mask, score: float, overwrite: bool = True) -> bool:
        """Record the object on ``frame``; True when it is visible there."""
        visible = score > VISIBLE_SCORE and not mask.is_empty
        if overwrite or frame not in self.boxes:
            self.boxes[frame] = tuple(float(v) for v in mask.box()) if visible else None
            if visible:
                self.visibility.append(score)
        return visible

    def track(self, manual=()) -> Track:
        frames = sorted(self.boxes)
        while frames and self.boxes[frames[0]] is None:  # before it first appears: nothing to say
            frames.pop(0)
        detected = float(np.mean(self.detections)) if self.detections else 1.0
        seen = float(np.mean(self.visibility)) if self.visibility else 0.0
        return Track(self.track_id, self.label, round(detected * seen, 4),
                     tuple(TrackedBox(f, self.boxes[f]) for f in frames), tuple(manual))


@dataclass(frozen=True)
class RunResult:
    tracks: tuple[Track, ...]
    frames: int  # frames decoded and tracked
    truncated: str | None = None


def _record(building: dict[int, TrackBuilder], objects, overwrite: bool = True) -> list[int]:
    """Record a :class:`~backend.engine.tracker.FrameObjects`; the ids visible on its frame."""
    visible = []
    for obj_id, mask, score in zip(objects.ids, objects.masks, objects.scores):
        if obj_id in building and building[obj_id].record(objects.frame, mask, float(score), overwrite):
            visible.append(obj_id)
    return visible


def track_text(source, tracker, detect: Callable[[Image.Image], Detections],
               select: Callable[[ImageResult], Sequence[Selected]], params: TrackParams,
               deadline: Deadline) -> RunResult:
    """Text prompt → tracks over the whole video (see the module docstring).

    ``detect``: an RGB frame → the detector's detections (XYXY pixels); ``select``: the detections
    with their masks → those that become tracks, each with its config label (thresholds, caps)."""
    width, height = source.info.width, source.info.height
    session = tracker.session(width, height)
    building: dict[int, TrackBuilder] = {}
    backward: list[tuple[int, list[int], np.ndarray]] = []
    frames, truncated, ignored = 0, None, 0
    for frame in source.frames():
        if deadline.passed():
            truncated = deadline.reason()
            break
        frames += 1
        session.add_frame(frame.frame, frame.image)
        objects = session.track(frame.frame) if building else None
        if (frame.frame - 1) % params.detect_every == 0:
            new = _new_objects(session, frame, objects, detect, select, params, building)
            ignored += new.ignored
            if new.ids:
                session.prompt_boxes(frame.frame, new.ids, new.boxes)
                objects = session.track(frame.frame)  # the live objects again, the same result
                if frame.frame > 1:
                    backward.append((frame.frame, new.ids, new.boxes))
        if objects is not None:
            _record(building, objects)
    if ignored:
        log.info("%d detections ignored: VIDEO_MAX_OBJECTS=%d tracks already", ignored, params.max_objects)
    for start, ids, boxes in backward:
        if deadline.passed():
            truncated = truncated or deadline.reason()
            break
        _follow_backward(source, tracker, start, ids, boxes, building, params, deadline)
    return RunResult(tuple(b.track() for b in building.values() if any(v is not None for v in b.boxes.values())),
                     frames, truncated)


@dataclass(frozen=True)
class _New:
    ids: list[int]
    boxes: np.ndarray
    ignored: int


def _new_objects(session, frame, objects, detect, select, params: TrackParams, building) -> _New:
    """Detect on ``frame``; a detection whose mask overlaps a live track's (or an earlier detection's
    on this frame) by ``match_iou`` continues it; the others start new tracks (returned)."""
    detections = detect(Image.fromarray(frame.image))
    if not len(detections):
        return _New([], np.zeros((0, 4)), 0)
    masks, low = session.segment_boxes(frame.frame, detections.boxes)
    result = ImageResult(session.width, session.height, detections, tuple(masks))
    index = {id(mask): i for i, mask in enumerate(masks)}
    live = objects is not None and len(objects.ids) > 0
    from backend.engine.tracker import mask_iou  # torch: only where a tracker already runs

    overlaps = mask_iou(low, objects.low).cpu().numpy() if live else np.zeros((len(masks), 0))
    among = mask_iou(low, low).cpu().numpy()  # the detections against each other
    ids, boxes, firsts, ignored = [], [], [], 0
    for chosen in select(result):  # best first
        i = index[id(chosen.mask)]
        if overlaps.shape[1] and overlaps[i].max() >= params.match_iou:
            building[objects.ids[int(overlaps[i].argmax())]].detections.append(chosen.score)
            continue
        twin = next((k for k, j in enumerate(firsts) if among[i, j] >= params.match_iou), None)
        if twin is not None:  # the same object found again (another phrase): one track
            building[ids[twin]].detections.append(chosen.score)
            continue
        if len(building) >= params.max_objects:
            ignored += 1
            continue
        obj_id = len(building)
        building[obj_id] = TrackBuilder(region_id(), chosen.label, [chosen.score])
        ids.append(obj_id)
        firsts.append(i)
        boxes.append(np.asarray(chosen.box, np.float64))
    return _New(ids, np.array(boxes).reshape(-1, 4), ignored)


def _follow_backward(source, tracker, start: int, ids: list[int], boxes: np.ndarray, building, params, deadline,
                     ) -> None:
    """Follow objects first seen on ``start`` backward until each is lost (or track_frames)."""
    session = tracker.session(source.info.width, source.info.height)
    session.prompt_boxes(start, ids, boxes)
    lost = 0
    for frame in source.frames_reversed(max(1, start - params.track_frames), start):
        if deadline.passed():
            return
        objects = session.track(frame.frame, frame.image)
        if frame.frame == start:
            continue  # the forward run has this frame
        visible = _record(building, objects, overwrite=False)  # the session holds ``ids`` only
        lost = 0 if visible else lost + 1
        if lost >= LOST_PATIENCE:
            return


def track_boxes(source, tracker, tracks: Sequence[ContextTrack], labels: Sequence[str], params: TrackParams,
                deadline: Deadline) -> RunResult:
    """An annotator's tracks → the same tracks (same ids, same keyframes) followed through the
    video; ``labels``: the label of each (LS sends the one the annotator clicked)."""
    width, height, end = source.info.width, source.info.height, source.frames_count
    building = {i: TrackBuilder(t.track_id, label) for i, (t, label) in enumerate(zip(tracks, labels))}
    frames, truncated = 0, None
    runs = []  # (backward?, the keyframe each track starts from)
    if params.direction in ("forward", "both"):
        runs.append((False, [(i, t.keyframes[-1]) for i, t in enumerate(tracks)]))
    if params.direction in ("backward", "both"):
        runs.append((True, [(i, t.keyframes[0]) for i, t in enumerate(tracks)]))
    for reverse, starts in runs:
        session = tracker.session(width, height)
        by_frame: dict[int, list[tuple[int, np.ndarray]]] = {}
        for i, key in starts:
            box = PercentRect(key.x, key.y, key.width, key.height, key.rotation).pixel_box(width, height)
            by_frame.setdefault(min(key.frame, end), []).append((i, np.clip(np.array(box), 0, [width, height] * 2)))
        first, last = min(by_frame), max(by_frame)
        span = (max(1, first - params.track_frames), last) if reverse else (first, min(end, last + params.track_frames))
        stream = source.frames_reversed(*span) if reverse else source.frames(*span)
        limit = {i: key.frame for i, key in starts}
        for frame in stream:
            if deadline.passed():
                truncated = deadline.reason()
                break
            frames += 1
            for i, box in by_frame.get(frame.frame, []):
                session.prompt_boxes(frame.frame, [i], box[None])
            if not session.object_ids:
                continue
            objects = session.track(frame.frame, frame.image)
            for obj_id, mask, score in zip(objects.ids, objects.masks, objects.scores):
                distance = limit[obj_id] - frame.frame if reverse else frame.frame - limit[obj_id]
                if 0 < distance <= params.track_frames:
                    building[obj_id].record(frame.frame, mask, float(score))
    out = []
    for i, track in enumerate(tracks):
        built = building[i].track(manual=track.keyframes)
        out.append(Track(built.track_id, built.label, built.score if built.boxes else 1.0, built.boxes,
                         built.manual))
    return RunResult(tuple(out), frames, truncated)
