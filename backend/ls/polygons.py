"""Mask → polygons: the outer contours of a :class:`CompactMask`, simplified, one per component.

Contours come from OpenCV (``cv2.findContours`` with ``RETR_EXTERNAL``: Suzuki's border following,
foreground 8-connected) on the mask's crop, so the work scales with the object, not the image; each
contour is simplified with Douglas–Peucker (``cv2.approxPolyDP``) at ``tolerance`` pixels, or less
for a thin component: at most a tenth of its mean width (2 x area / perimeter), because a
simplification error of 1.5 px is nothing on a car but half of a 4-pixel-wide cable (measured on a
diagonal line 4 px wide: IoU of the polygon with the mask 0.69 at 1.5 px, 0.995 at 0.4 px). Objects
wider than ``10 x tolerance`` use ``tolerance`` as given.

Frame: the pixel frame of the EXIF-transposed image (x right, y down). A contour runs through the
*centres* of the mask's boundary pixels, so pixel ``(col, row)`` gives the vertex
``(col + 0.5, row + 0.5)``: the polygon lies half a pixel inside the mask's edge on every side
(centred on the object, not shifted towards the top-left), and ``cv2.fillPoly`` of the vertices
minus 0.5 gives the mask's pixels back. Percent conversion is ``geometry.py``'s.

What a polygon cannot say: LS polygons have no holes, so a component's polygon covers its holes
(and any island inside them); the brush region keeps them. A component whose simplified outline
has fewer than 3 vertices (a speck, a one-pixel-wide line) is not a polygon and is skipped. A mask
yields at most :data:`MAX_POLYGONS` polygons, the largest components: a ragged mask of thousands of
specks would otherwise become a prediction of megabytes that LS stores and renders region by region.
Imports numpy, OpenCV and the foundation's ``backend.results``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from backend.results import CompactMask

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1.5  # pixels: about the stair-step of a diagonal edge, so vertices follow the shape
MAX_TOLERANCE = 100.0  # pixels; more than this would turn every object into a triangle
MAX_POLYGONS = 500  # per mask; a real object has a handful of components
THIN_FRACTION = 0.1  # a component's tolerance is at most this fraction of its mean width


def check_tolerance(name: str, value: float) -> float:
    """A Douglas–Peucker tolerance in pixels: a finite number in [0, MAX_TOLERANCE]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= MAX_TOLERANCE:
        raise ValueError(f"{name} must be pixels in [0, {MAX_TOLERANCE:g}] (e.g. {DEFAULT_TOLERANCE}), "
                         f"not {value!r}")
    return float(value)


@dataclass(frozen=True)
class PolygonParams:
    """How masks become polygons.

    tolerance: Douglas–Peucker tolerance in pixels (0 keeps every contour vertex); thin components
               use less (:data:`THIN_FRACTION` of their mean width).
    min_area:  a connected component whose outline covers fewer pixels than this (holes included:
               the pixels its polygon covers) yields no polygon (1: nothing is dropped).
    """

    tolerance: float = DEFAULT_TOLERANCE
    min_area: int = 1

    def __post_init__(self):
        check_tolerance("polygon tolerance", self.tolerance)
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, int) or self.min_area < 0:
            raise ValueError(f"the minimum polygon area must be a whole number of pixels >= 0, "
                             f"not {self.min_area!r}")


def _covered_pixels(contour: np.ndarray, area: float) -> float:
    """How many pixels the component's outline covers (holes included: what its polygon covers), from
    the outline alone by Pick's theorem: interior + boundary lattice points = area + boundary / 2 + 1.

    ``area`` is the outline's ``cv2.contourArea``. A ``CHAIN_APPROX_SIMPLE`` contour's segments are
    horizontal, vertical or diagonal, so a segment holds max(|dx|, |dy|) boundary points. Exact for
    every outline, also one that runs back over a one-pixel-wide part (there the area adds nothing
    and the boundary counts each pixel twice); a labelling pass (``cv2.connectedComponents``) would
    cost 20x the contour tracing on a large crop."""
    points = contour.reshape(-1, 2)
    steps = np.abs(np.diff(points, axis=0, append=points[:1]))
    return area + steps.max(axis=1).sum() / 2.0 + 1.0


def _tolerance(contour: np.ndarray, area: float, tolerance: float) -> float:
    """``tolerance``, capped at :data:`THIN_FRACTION` of the contour's mean width (2 x area / perimeter)."""
    perimeter = cv2.arcLength(contour, True)
    return min(tolerance, THIN_FRACTION * 2.0 * area / perimeter) if perimeter > 0 else tolerance


def mask_polygons(mask: CompactMask, params: PolygonParams = PolygonParams()) -> list[np.ndarray]:
    """The polygons of one mask: a list of (V, 2) float64 pixel vertices (V >= 3), one per
    8-connected component covering at least ``params.min_area`` pixels, largest component first,
    at most :data:`MAX_POLYGONS`."""
    if mask.is_empty:
        return []
    crop = np.ascontiguousarray(mask.crop, dtype=np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                   offset=(mask.left, mask.top))
    if not contours:
        return []
    outline_areas = [cv2.contourArea(c) for c in contours]  # of the pixel-centre outline
    pixels = np.array([_covered_pixels(c, a) for c, a in zip(contours, outline_areas)])
    polygons = []
    order = np.argsort(-pixels, kind="stable")
    for index in order:
        if len(polygons) == MAX_POLYGONS:
            log.debug("a mask with %d components: kept the %d largest as polygons", len(order), MAX_POLYGONS)
            break
        if pixels[index] < params.min_area:
            break  # sorted by area: every component after this one is smaller
        tolerance = _tolerance(contours[index], outline_areas[index], params.tolerance)
        simplified = cv2.approxPolyDP(contours[index], tolerance, True).reshape(-1, 2)
        if len(simplified) >= 3:
            polygons.append(simplified.astype(np.float64) + 0.5)  # pixel index → pixel centre
    return polygons
