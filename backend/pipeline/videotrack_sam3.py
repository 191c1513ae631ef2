"""Text → tracks with SAM 3's video model (ENGINE=sam3): one streaming pass over the video.

Unlike :func:`backend.pipeline.videotrack.track_text` (a detector every ``detect_every`` frames,
SAM 2.1 carrying the objects between, IoU matching, a backward pass for late objects), SAM 3
detects every phrase on every frame and its own rules match detections to tracks, start new
objects and drop duplicates (:mod:`backend.engine.sam3_video`). So one forward pass gives every
track; ``detect_every``, ``track_frames`` and ``match_iou`` of :class:`TrackParams` do not apply,
``max_objects`` does.

Each SAM 3 object becomes one :class:`~backend.tracks.Track`: its label is the config label its
phrase maps to (``label_for``; an object whose phrase maps to none is dropped), its score the mean
of its instance scores over the frames it is on, its boxes one per frame from its first
appearance, None on the frames the model does not report it (lost, or its mask empty). Frames
are LS frame numbers; boxes XYXY pixels of the decoded frame. Every frame is checked against the
:class:`Deadline`; a run stopped by it keeps what it has (the frames the model holds back for its
hotstart rules included). No torch here: the model comes in as an object.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from backend.ls.regions import region_id
from backend.pipeline.videotrack import Deadline, RunResult, TrackBuilder, TrackParams

log = logging.getLogger(__name__)


def track_text_sam3(source, sam3_video, phrases: Sequence[str], label_for: Callable[[str], str | None],
                    params: TrackParams, deadline: Deadline) -> RunResult:
    """Track every instance of ``phrases`` through ``source`` (a :class:`~backend.images.video.VideoSource`)
    with ``sam3_video`` (a :class:`~backend.engine.sam3_video.Sam3VideoTracker`)."""
    width, height = source.info.width, source.info.height
    stream = sam3_video.stream(width, height, list(phrases), source.frames_count)
    building: dict[int, TrackBuilder] = {}
    skipped: dict[int, str] = {}  # object id → why it makes no track
    frames, truncated = 0, None

    def record(found) -> None:
        on_frame = set()
        for obj_id, phrase, score, mask in zip(found.ids, found.phrases, found.scores, found.masks):
            track = building.get(obj_id)
            if track is None and obj_id not in skipped:
                label = label_for(phrase)
                if label is None:
                    skipped[obj_id] = f"phrase {phrase!r} maps to no label"
                elif len(building) >= params.max_objects:
                    skipped[obj_id] = f"VIDEO_MAX_OBJECTS={params.max_objects} tracks already"
                else:
                    track = building[obj_id] = TrackBuilder(region_id(), label)
            if track is None:
                continue
            track.detections.append(float(score))
            if track.record(found.frame, mask, 1.0):  # reported by the model: visible where its mask is
                on_frame.add(obj_id)
        for obj_id, track in building.items():
            if obj_id not in on_frame and track.boxes:
                track.boxes[found.frame] = None  # absent after it appeared

    for frame in source.frames():
        if deadline.passed():
            truncated = deadline.reason()
            break
        frames += 1
        for found in stream.push(frame.frame, frame.image):
            record(found)
    for found in stream.finish():
        record(found)
    if skipped:
        reasons: dict[str, int] = {}
        for reason in skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        log.info("SAM 3 objects without a track: %s", "; ".join(f"{n} ({r})" for r, n in reasons.items()))
    tracks = tuple(b.track() for _, b in sorted(building.items()) if any(v is not None for v in b.boxes.values()))
    return RunResult(tracks, frames, truncated)
