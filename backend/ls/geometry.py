"""LS percent ↔ pixels: the one place that converts Label Studio coordinates.

LS stores a region in percent of the image it displays (the EXIF-transposed image, which is also
the pixel frame of everything the engine takes and returns): ``x`` and ``width`` in percent of the
image's width, ``y`` and ``height`` in percent of its height. One percent along x and one along y
are different lengths on a non-square image, so nothing may rotate in percent: a rectangle is
converted to pixels first and rotated there. LS rotates a rectangle by ``rotation`` degrees
clockwise on screen (y points down) about its top-left corner ``(x, y)``.

Pixel frame: x right, y down, (0, 0) the top-left corner of the image, ``width x height`` pixels.
Imports nothing from the backend (pure arithmetic); the regions, the smart-tool prompts and the
CLI overlay all go through here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Point = tuple[float, float]
PixelBox = tuple[float, float, float, float]  # x0, y0, x1, y1: axis-aligned, in pixels


def percent_to_pixels(x: float, y: float, width: int, height: int) -> Point:
    """A point (a keypoint, a corner) in LS percent of a ``width x height`` image → pixels."""
    return x * width / 100.0, y * height / 100.0


@dataclass(frozen=True)
class PercentRect:
    """A rectangle as LS stores it: top-left corner, size (percent) and rotation (degrees, clockwise
    about the top-left corner)."""

    x: float
    y: float
    width: float
    height: float
    rotation: float = 0  # an int 0 by default: LS JSON of an unrotated rectangle says 0

    @classmethod
    def from_pixel_box(cls, box, width: int, height: int) -> "PercentRect":
        """An axis-aligned (x0, y0, x1, y1) pixel box of a ``width x height`` image → LS percent."""
        x0, y0, x1, y1 = (float(v) for v in box)
        return cls(x=100.0 * x0 / width, y=100.0 * y0 / height,
                   width=100.0 * (x1 - x0) / width, height=100.0 * (y1 - y0) / height)

    def corners(self, width: int, height: int) -> tuple[Point, Point, Point, Point]:
        """Pixel corners on a ``width x height`` image: top-left, top-right, bottom-right,
        bottom-left of the unrotated rectangle (so in drawing order), after the rotation."""
        left, top = percent_to_pixels(self.x, self.y, width, height)
        w, h = percent_to_pixels(self.width, self.height, width, height)
        angle = math.radians(self.rotation)
        cos, sin = math.cos(angle), math.sin(angle)
        return tuple((left + dx * cos - dy * sin, top + dx * sin + dy * cos)  # type: ignore[return-value]
                     for dx, dy in ((0.0, 0.0), (w, 0.0), (w, h), (0.0, h)))

    def pixel_box(self, width: int, height: int) -> PixelBox:
        """The axis-aligned pixel bounds of the (rotated) rectangle, not clipped to the image."""
        xs, ys = zip(*self.corners(width, height))
        return min(xs), min(ys), max(xs), max(ys)

    def value(self) -> dict:
        """The rectangle's fields of an LS ``rectanglelabels`` value."""
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "rotation": self.rotation}


def pixel_points_to_percent(points, width: int, height: int):
    """(V, 2) numpy array of pixel points (x, y) of a ``width x height`` image → LS percent (V, 2)
    (a polygon's ``points``)."""
    return points * (100.0 / width, 100.0 / height)
