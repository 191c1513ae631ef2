"""What the engine takes and returns, as plain numpy dataclasses (no torch), so the web process,
regions.py and refine.py can use them without importing the models' stack."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Detections of one image.

    boxes:   (N, 4) float32, XYXY pixels of the EXIF-transposed image, clipped to it.
    scores:  (N,) float32 in [0, 1], sorted descending.
    phrases: N prompt phrases, the one each box was grounded to.
    """

    boxes: np.ndarray
    scores: np.ndarray
    phrases: tuple[str, ...]

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), ())

    def __len__(self) -> int:
        return len(self.phrases)


@dataclass(frozen=True)
class ImageResult:
    """Detections of one image plus their masks: (N, height, width) bool."""

    width: int
    height: int
    detections: Detections
    masks: np.ndarray


@dataclass(frozen=True)
class MaskPrompt:
    """One mask to predict, in pixels of the EXIF-transposed image.

    box: (4,) XYXY or None; points: (K, 2) XY; point_labels: (K,) 1 = positive, 0 = negative click.
    """

    box: np.ndarray | None
    points: np.ndarray
    point_labels: np.ndarray
