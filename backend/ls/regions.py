"""Engine results → Label Studio prediction JSON.

This is the only place that converts pixels to LS percent. Input boxes and masks are in the pixel
frame of the EXIF-transposed image; LS stores rectangles in percent of that same image and brush
masks as RLE of exactly ``original_height x original_width``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backend.engine.results import CompactMask, ImageResult
from backend.ls.labelconfig import LabelConfig
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
    x0, y0, x1, y1 = (float(v) for v in box)
    return {
        "id": region_id(), "from_name": config.rectangle.name, "to_name": config.rectangle.to_name,
        "type": "rectanglelabels", "original_width": width, "original_height": height,
        "image_rotation": 0, "score": score,
        "value": {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height,
                  "width": 100.0 * (x1 - x0) / width, "height": 100.0 * (y1 - y0) / height,
                  "rotation": 0, "rectanglelabels": [label]},
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


def percent_to_pixels(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """A point in LS percent of an image → pixels of that image (the inverse of the rectangles above)."""
    return x * width / 100.0, y * height / 100.0


def build_prediction(result: ImageResult, config: LabelConfig, model_version: str,
                     encode_mask: Callable[[CompactMask], list[int]] = compact_mask_rle) -> tuple[dict, RegionStats]:
    """One LS prediction for one image: a rectangle and/or a brush region per mapped detection.

    ``encode_mask`` turns a mask into LS RLE (the benchmark's anchor path passes the SDK's).

    A detection whose phrase maps to no config label is dropped (counted in the stats). A label
    present in only one of the two controls yields only that control's region.
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
        if config.rectangle and label in config.rectangle.labels:
            regions.append(_rectangle(config, label, detections.boxes[index], score, result.width, result.height))
        if config.brush and label in config.brush.labels:
            regions.append(_brush(config, label, encode_mask(result.masks[index]), score, result.width,
                                      result.height))
        scores.append(score)
    stats.regions = len(regions)
    return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0,
            "model_version": model_version}, stats
