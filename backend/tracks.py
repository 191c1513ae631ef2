"""The torch-free types of video tracking: what the tracker returns and what ``ls/videoregions``
turns into ``videorectangle`` results. A foundation module (numpy only), like :mod:`backend.results`.

Frames are LS frame numbers (1-based; see :mod:`backend.ls.videotime` for how they map to time);
boxes are XYXY pixels of the decoded video frame (``width x height``), never LS percent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TrackedBox:
    """One frame of one tracked object.

    frame: LS frame number (1-based).
    box:   (4,) float XYXY pixels of the video frame, or None where the object is not visible
           (lost, occluded, or its mask empty): the frame after a visible segment's last frame.
    """

    frame: int
    box: tuple[float, float, float, float] | None


@dataclass(frozen=True)
class Keyframe:
    """A keyframe exactly as LS stores it (percent of the frame; ``time`` as LS writes it). An
    annotator's keyframes are carried through tracking untouched, as these."""

    frame: int
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    enabled: bool = True
    time: float = 0.0

    def to_json(self) -> dict:
        """The eight keys LS reads and its exporter requires."""
        return {"frame": self.frame, "x": self.x, "y": self.y, "width": self.width, "height": self.height,
                "rotation": self.rotation, "enabled": self.enabled, "time": self.time}


@dataclass(frozen=True)
class Track:
    """One object through the video: the region LS shows as one ``videorectangle``.

    track_id: the LS region id (an annotator's track keeps its own; new tracks get a fresh one).
    label:    the config label it is written under.
    score:    in [0, 1]: the mean detector score of its detections (or 1.0 for an annotator's box),
              times the tracker's mean visibility confidence.
    boxes:    tracked frames, sorted by frame, unique; frames not listed are untracked.
    manual:   the annotator's own keyframes (an interactive call's track), kept exactly; tracked
              boxes never replace a frame they hold.
    """

    track_id: str
    label: str
    score: float
    boxes: tuple[TrackedBox, ...]
    manual: tuple[Keyframe, ...] = field(default=())

    def visible_frames(self) -> int:
        return sum(1 for b in self.boxes if b.box is not None)


@dataclass(frozen=True)
class VideoTracks:
    """Everything tracked in one video task.

    width, height: the decoded frame's size in pixels (the frame the boxes are in).
    fps:           the config's frame rate (LS's, not the file's).
    duration:      seconds, the container's duration as the browser reports it.
    frames_count:  LS's ``framesCount`` (``round(duration * fps)``).
    truncated:     why tracking stopped early (a deadline, MAX_VIDEO_FRAMES), or None.
    """

    width: int
    height: int
    fps: float
    duration: float
    frames_count: int
    tracks: tuple[Track, ...]
    truncated: str | None = None


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (4,) XYXY boxes."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
