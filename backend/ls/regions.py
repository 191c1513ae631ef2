"""Engine results → Label Studio prediction JSON.

Input boxes and masks are in the pixel frame of the EXIF-transposed image; LS stores rectangles in
percent of that same image (converted by ``geometry.py``), brush masks as RLE of exactly
``original_height x original_width``, bitmasks as a PNG of exactly that size (``backend.bitmask``:
black and opaque on the mask, transparent elsewhere, in a data URL), and polygons (``polygons.py``:
the mask's outer contours, one region per connected component) as percent points of that image.
Two inputs: :class:`ImageResult` (text prompt: which detections are kept, under which label and as
which region kinds, is decided by ``selection.py``) and :class:`LabeledMasks` (smart tools: each
mask already carries its label; no threshold applies).

May import: ``labelconfig``, ``geometry``, ``options``, ``polygons`` and ``selection`` of this package, and the
foundation modules ``backend.rle``, ``backend.bitmask`` and ``backend.results`` (the engine's torch-free
result types).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backend.bitmask import crop_to_png, png_data_url
from backend.ls.geometry import PercentRect, pixel_points_to_percent
from backend.ls.labelconfig import LabelConfig
from backend.ls.options import OUTPUT_KINDS, PredictOptions
from backend.ls.polygons import PolygonParams, mask_polygons
from backend.ls.selection import DropReason, SelectDefaults, select_detections
from backend.results import CompactMask, ImageResult, LabeledMasks
from backend.rle import band_to_rle

log = logging.getLogger(__name__)


@dataclass
class RegionStats:
    """What happened to the detections of one prediction, for logs and metrics."""

    regions: int = 0
    dropped_phrases: dict[str, int] = field(default_factory=dict)
    dropped: dict[DropReason, int] = field(default_factory=dict)  # every dropped detection, by reason


def region_id() -> str:
    """16 random hex characters: unique across a project for all practical purposes."""
    return secrets.token_hex(8)


def empty_prediction(model_version: str) -> dict:
    return {"result": [], "score": 0.0, "model_version": model_version}


def _rectangle(config: LabelConfig, label: str, box: np.ndarray, score: float, width: int, height: int) -> dict:
    return {
        "id": region_id(), "from_name": config.rectangle.name, "to_name": config.rectangle.to_name,
        "type": "rectanglelabels", "original_width": width, "original_height": height,
        "image_rotation": 0, "score": score,
        "value": {**PercentRect.from_pixel_box(box, width, height).value(), "rectanglelabels": [label]},
    }


def compact_mask_rle(mask: CompactMask) -> list[int]:
    """LS brush RLE of a compact mask, encoding only the rows that hold its foreground."""
    return band_to_rle(mask.band(), mask.top, mask.height)


def _brush(config: LabelConfig, label: str, rle: list[int], score: float, width: int, height: int) -> dict:
    return {
        "id": region_id(), "from_name": config.brush.name, "to_name": config.brush.to_name,
        "type": "brushlabels", "original_width": width, "original_height": height,
        "image_rotation": 0, "score": score,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def compact_mask_png(mask: CompactMask) -> bytes:
    """LS bitmask PNG of a compact mask (the image's size), compressing only the rows of its crop."""
    return crop_to_png(mask.crop, mask.top, mask.left, mask.height, mask.width)


def _bitmask(config: LabelConfig, label: str, mask: CompactMask, score: float, width: int, height: int) -> list[dict]:
    """One ``bitmasklabels`` region: the mask as a PNG data URL, as LS's own drawn bitmasks. An empty
    mask yields none (LS would list a region with nothing to show)."""
    if mask.is_empty:
        return []
    return [{
        "id": region_id(), "from_name": config.bitmask.name, "to_name": config.bitmask.to_name,
        "type": "bitmasklabels", "original_width": width, "original_height": height,
        "image_rotation": 0, "score": score,
        "value": {"imageDataURL": png_data_url(compact_mask_png(mask)), "bitmasklabels": [label]},
    }]


def _polygons(config: LabelConfig, label: str, mask: CompactMask, score: float, width: int, height: int,
              params: PolygonParams) -> list[dict]:
    """One ``polygonlabels`` region per connected component of the mask (LS's export shape)."""
    return [{
        "id": region_id(), "from_name": config.polygon.name, "to_name": config.polygon.to_name,
        "type": "polygonlabels", "original_width": width, "original_height": height,
        "image_rotation": 0, "score": score,
        "value": {"points": pixel_points_to_percent(points, width, height).tolist(), "closed": True,
                  "polygonlabels": [label]},
    } for points in mask_polygons(mask, params)]


def _regions(config: LabelConfig, label: str, box: np.ndarray, mask: CompactMask, score: float, width: int,
             height: int, encode_mask: Callable[[CompactMask], list[int]], polygon: PolygonParams,
             kinds: tuple[str, ...] = OUTPUT_KINDS) -> list[dict]:
    """The rectangle, brush, polygon and bitmask regions of one labeled mask: for each control that
    has the label, among ``kinds`` (the region kinds the detection was selected for)."""
    regions = []
    if config.rectangle and "rectangle" in kinds and label in config.rectangle.labels:
        regions.append(_rectangle(config, label, box, score, width, height))
    if config.brush and "brush" in kinds and label in config.brush.labels:
        regions.append(_brush(config, label, encode_mask(mask), score, width, height))
    if config.polygon and "polygon" in kinds and label in config.polygon.labels:
        regions += _polygons(config, label, mask, score, width, height, polygon)
    if config.bitmask and "bitmask" in kinds and label in config.bitmask.labels:
        regions += _bitmask(config, label, mask, score, width, height)
    return regions


def polygon_params(polygon: PolygonParams, options: PredictOptions, default_min_area: float, width: int,
                   height: int) -> PolygonParams:
    """The polygon parameters of one image: the project's ``polygon_tolerance`` over the deployment's,
    and the minimum mask area (pixels, see ``PredictOptions.min_area_pixels``) as the minimum area of
    a polygon's component too, so a speck of a kept mask yields no polygon either."""
    min_area = max(polygon.min_area, options.min_area_pixels(default_min_area, width, height))
    return PolygonParams(tolerance=options.tolerance(polygon.tolerance), min_area=min_area)


def _prediction(regions: list[dict], scores: list[float], model_version: str) -> dict:
    return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0, "model_version": model_version}


def build_prediction(result: ImageResult, config: LabelConfig, model_version: str,
                     encode_mask: Callable[[CompactMask], list[int]] = compact_mask_rle,
                     options: PredictOptions = PredictOptions(),
                     defaults: SelectDefaults = SelectDefaults(),
                     polygon: PolygonParams = PolygonParams()) -> tuple[dict, RegionStats]:
    """One LS prediction for one image: a rectangle, a brush, polygon and bitmask regions per selected
    detection.

    ``encode_mask`` turns a mask into LS RLE (the benchmark's anchor path passes the SDK's).
    ``options``/``defaults``: the request's and the deployment's selection (thresholds, minimum
    mask area, cap per label, output kinds; see ``selection.py``); the defaults only map phrases.
    ``polygon``: the deployment's polygon tolerance (the project's ``polygon_tolerance`` wins).

    A detection whose phrase maps to no config label is dropped (counted in the stats). A label
    present in only some of the output controls yields only those controls' regions.
    """
    stats = RegionStats()
    regions, scores = [], []
    selection = select_detections(result, config, options, defaults)
    stats.dropped_phrases, stats.dropped = selection.unmapped_phrases, selection.dropped
    polygon = polygon_params(polygon, options, defaults.min_mask_area, result.width, result.height)
    for item in selection.kept:
        regions += _regions(config, item.label, item.box, item.mask, item.score, result.width, result.height,
                            encode_mask, polygon, item.kinds)
        scores.append(item.score)
    stats.regions = len(regions)
    return _prediction(regions, scores, model_version), stats


def build_mask_prediction(result: LabeledMasks, config: LabelConfig, model_version: str,
                          polygon: PolygonParams = PolygonParams(), kinds: tuple[str, ...] = OUTPUT_KINDS) -> dict:
    """One LS prediction for one image from its smart-tool masks: per mask, for each control with its
    label, a brush region, the mask's bounding rectangle, its polygons and its bitmask (no threshold
    applies)."""
    regions, scores = [], []
    for item in result.masks:
        regions += _regions(config, item.label, item.box, item.mask, item.score, result.width, result.height,
                            compact_mask_rle, polygon, kinds)
        scores.append(item.score)
    return _prediction(regions, scores, model_version)
