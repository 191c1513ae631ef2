"""The types that cross the engine's boundary, as plain numpy dataclasses (no torch): what the
engine takes (:class:`MaskPrompt`) and returns (:class:`Detections`, :class:`CompactMask`,
:class:`ImageResult`; :class:`PromptedMask` / :class:`LabeledMasks` for smart tools). A foundation
module, so both the engine, which makes them, and ``ls/regions.py``, which turns them into LS JSON,
can read them, and the web process never imports the models' stack. Imports numpy only.

Text prompts give :class:`ImageResult` (detections, each with the phrase it was grounded to, and
their masks); smart-tool prompts give :class:`LabeledMasks` (one :class:`PromptedMask` per
click/box prompt, each with the config label it is written under). Every coordinate is in pixels of
the EXIF-transposed image.
"""

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
class CompactMask:
    """A (height, width) bool mask stored as the crop of its foreground's bounding box.

    crop: (bottom - top, right - left) bool, rows [top, bottom) and columns [left, right) of the
    full mask, in pixels of the EXIF-transposed image; every pixel outside it is background. An
    empty mask has a (0, 0) crop. A 1080p mask of a 5%-of-the-image object is ~100 KB instead of
    2 MB, and its RLE only has to look at the crop's rows.
    """

    height: int
    width: int
    top: int
    left: int
    crop: np.ndarray

    @classmethod
    def from_full(cls, mask: np.ndarray) -> "CompactMask":
        """(H, W) bool (or numeric, nonzero = foreground) → its compact form."""
        mask = np.asarray(mask) != 0
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            return cls.empty(*mask.shape)
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(mask.shape[0], mask.shape[1], int(top), int(left), mask[top:bottom, left:right].copy())

    @classmethod
    def empty(cls, height: int, width: int) -> "CompactMask":
        return cls(height, width, 0, 0, np.zeros((0, 0), bool))

    @property
    def is_empty(self) -> bool:
        return self.crop.size == 0

    @property
    def bottom(self) -> int:
        return self.top + self.crop.shape[0]

    @property
    def right(self) -> int:
        return self.left + self.crop.shape[1]

    def box(self) -> np.ndarray | None:
        """(4,) float32 XYXY pixel bounds of the foreground, or None when the mask is empty."""
        if self.is_empty:
            return None
        return np.array([self.left, self.top, self.right, self.bottom], np.float32)

    def band(self) -> np.ndarray:
        """(bottom - top, width) bool: the full-width rows that hold all the foreground."""
        band = np.zeros((self.crop.shape[0], self.width), bool)
        band[:, self.left:self.right] = self.crop
        return band

    def full(self) -> np.ndarray:
        """(height, width) bool: the whole mask."""
        mask = np.zeros((self.height, self.width), bool)
        mask[self.top:self.bottom, self.left:self.right] = self.crop
        return mask


@dataclass(frozen=True)
class ImageResult:
    """Detections of one image plus one compact mask per detection, in the same order."""

    width: int
    height: int
    detections: Detections
    masks: tuple[CompactMask, ...]

    def full_masks(self) -> np.ndarray:
        """(N, height, width) bool: every mask at full size (for tests and small images)."""
        return np.stack([m.full() for m in self.masks]) if self.masks else np.zeros((0, self.height, self.width), bool)


@dataclass(frozen=True)
class MaskPrompt:
    """One mask to predict, in pixels of the EXIF-transposed image.

    box: (4,) XYXY or None; points: (K, 2) XY; point_labels: (K,) 1 = positive, 0 = negative click.
    """

    box: np.ndarray | None
    points: np.ndarray
    point_labels: np.ndarray


@dataclass(frozen=True)
class PromptedMask:
    """One SAM mask made from one smart-tool prompt (:class:`MaskPrompt`).

    label: the config label the region is written under (the smart region's own label or, with a
           text prompt, the phrase of the detection it refines, mapped to the config's labels).
    mask:  non-empty, in pixels of the EXIF-transposed image.
    score: SAM's predicted IoU for the mask, clipped to [0, 1].
    """

    label: str
    mask: CompactMask
    score: float

    @property
    def box(self) -> np.ndarray:
        """(4,) float32 XYXY pixel bounds of the mask: the rectangle written next to the brush."""
        return self.mask.box()


@dataclass(frozen=True)
class LabeledMasks:
    """The smart-tool masks of one ``width x height`` image, best score first."""

    width: int
    height: int
    masks: tuple[PromptedMask, ...]
