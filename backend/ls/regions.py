"""Engine results → Label Studio prediction JSON.

Input boxes and masks are in the pixel frame of the EXIF-transposed image; LS stores rectangles in
percent of that same image (converted by ``geometry.py``), brush masks as RLE of exactly
``original_height x original_width``, and polygons (``polygons.py``: the mask's outer contours, one
region per connected component) as percent points of that image. Two inputs: :class:`ImageResult` (text prompt: each
detection's phrase is mapped to a config label here) and :class:`LabeledMasks` (smart tools: each
mask already carries its label).

May import: ``labelconfig``, ``geometry`` and ``polygons`` of this package, and the foundation modules
``backend.rle`` and ``backend.results`` (the engine's torch-free result types).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backend.ls.geometry import PercentRect, pixel_points_to_percent
from backend.ls.labelconfig import LabelConfig
from backend.ls.polygons import PolygonParams, mask_polygons
from backend.results import CompactMask, ImageResult, LabeledMasks
from backend.rle import band_to_rle

log = logging.getLogger(__name__)


@dataclass
class RegionStats:
    """What happened to the detections of one prediction, for logs and metrics."""

    regions: int = 0
    dropped_phrases: dict[str, int] = field(default_factory=dict)


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
             height: int, encode_mask: Callable[[CompactMask], list[int]], polygon: PolygonParams) -> list[dict]:
    """The rectangle, brush and polygon regions of one labeled mask, for each control that has the label."""
    regions = []
    if config.rectangle and label in config.rectangle.labels:
        regions.append(_rectangle(config, label, box, score, width, height))
    if config.brush and label in config.brush.labels:
        regions.append(_brush(config, label, encode_mask(mask), score, width, height))
    if config.polygon and label in config.polygon.labels:
        regions += _polygons(config, label, mask, score, width, height, polygon)
    return regions


def _prediction(regions: list[dict], scores: list[float], model_version: str) -> dict:
    return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0, "model_version": model_version}


def build_prediction(result: ImageResult, config: LabelConfig, model_version: str,
                     encode_mask: Callable[[CompactMask], list[int]] = compact_mask_rle,
                     polygon: PolygonParams = PolygonParams()) -> tuple[dict, RegionStats]:
    """One LS prediction for one image: a rectangle, a brush and polygon regions per mapped detection.

    ``encode_mask`` turns a mask into LS RLE (the benchmark's anchor path passes the SDK's);
    ``polygon``: the simplification tolerance and minimum component area of polygon regions.

    A detection whose phrase maps to no config label is dropped (counted in the stats). A label
    present in only some of the controls yields only those controls' regions.
    """
    stats = RegionStats()
    regions, scores = [], []
    detections = result.detections
    for index, phrase in enumerate(detections.phrases):
        label = config.map_phrase(phrase)
        if label is None:
            stats.dropped_phrases[phrase] = stats.dropped_phrases.get(phrase, 0) + 1
            continue
        score = float(detections.scores[index])
        regions += _regions(config, label, detections.boxes[index], result.masks[index], score, result.width,
                            result.height, encode_mask, polygon)
        scores.append(score)
    stats.regions = len(regions)
    return _prediction(regions, scores, model_version), stats


def build_mask_prediction(result: LabeledMasks, config: LabelConfig, model_version: str,
                          polygon: PolygonParams = PolygonParams()) -> dict:
    """One LS prediction for one image from its smart-tool masks: per mask, for each control with its
    label, a brush region, the mask's bounding rectangle, and its polygons."""
    regions, scores = [], []
    for item in result.masks:
        regions += _regions(config, item.label, item.box, item.mask, item.score, result.width, result.height,
                            compact_mask_rle, polygon)
        scores.append(item.score)
    return _prediction(regions, scores, model_version)
