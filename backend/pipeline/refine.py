"""Smart-tool refinement: clicks and boxes (and optionally a text prompt) → SAM masks → regions.

- Boxes: each smart rectangle becomes one mask, refined by the clicks that fall inside it.
- Clicks outside every box: one mask from all of them (positive and negative together).
- Text + clicks: the text prompt's detections, each refined by the clicks inside its box.
Each region keeps the label of the smart region that made it (a click's or box's own label; with
text, the detection's phrase), mapped to a config label. SAM's best of three candidate masks by
predicted IoU is returned as a region of each output control with its label: ``brushlabels``
(``BrushLabels``), the mask's bounding rectangle (``RectangleLabels``), its outline polygons
(``PolygonLabels``: one per connected component, simplified at ``polygon.tolerance`` pixels) and its
PNG (``BitmaskLabels``). Empty masks are dropped; no mask at all is an empty result, not an error.
Masks the context already holds (``brushlabels`` RLE, ``bitmasklabels`` PNG: the annotator's own or
accepted regions) are not prompts: they are left alone, as is every region type other than
``keypointlabels`` and ``rectanglelabels`` (``smartprompt.py``).
Percent → pixels goes through ``backend.ls.geometry``; masks travel as :class:`LabeledMasks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from backend.images.fetch import LoadedImage
from backend.ls.geometry import percent_to_pixels
from backend.ls.labelconfig import LabelConfig
from backend.ls.options import PredictOptions
from backend.ls.polygons import PolygonParams
from backend.ls.regions import RegionStats, build_mask_prediction
from backend.ls.selection import DropReason, Selection, above_own_threshold
from backend.ls.smartprompt import Click, SmartPrompt
from backend.results import Detections, LabeledMasks, MaskPrompt, PromptedMask

if TYPE_CHECKING:
    from backend.settings import DetectThresholds
    from backend.engine.engine import Engine


def _points(clicks: list[Click], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    points = np.array([percent_to_pixels(c.x, c.y, width, height) for c in clicks], np.float64).reshape(-1, 2)
    return points, np.array([1 if c.positive else 0 for c in clicks], np.int64)


def _inside(points: np.ndarray, box) -> np.ndarray:
    """(K,) bool: which (K, 2) pixel points lie in the (x0, y0, x1, y1) pixel box, edges included."""
    x0, y0, x1, y1 = box
    return (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)


def plan_prompts(smart: SmartPrompt, detections: Detections | None, width: int, height: int,
                 fallback_label: str) -> tuple[list[MaskPrompt], list[str]]:
    """The SAM prompts for one ``width x height`` image, in pixels, and the name of each: the smart
    region's label (``fallback_label`` when it has none) or, with ``detections``, the phrase."""
    prompts, names = [], []
    points, point_labels = _points(list(smart.clicks), width, height)
    if detections is not None:  # text + clicks: each detection takes the clicks inside its pixel box
        for box, phrase in zip(detections.boxes, detections.phrases):
            inside = _inside(points, box)
            prompts.append(MaskPrompt(np.array(box, np.float64), points[inside], point_labels[inside]))
            names.append(phrase)
        return prompts, names
    used = np.zeros(len(points), bool)
    for box in smart.boxes:  # a rotated rectangle prompts SAM with the axis-aligned pixel box around it
        bounds = box.pixel_box(width, height)
        inside = _inside(points, bounds)
        used |= inside
        clipped = np.clip(np.array(bounds, np.float64), 0, [width, height, width, height])
        prompts.append(MaskPrompt(clipped, points[inside], point_labels[inside]))
        names.append(box.label or fallback_label)
    loose = [c for c, is_used in zip(smart.clicks, used) if not is_used]
    if any(c.positive for c in loose):
        prompts.append(MaskPrompt(None, points[~used], point_labels[~used]))
        names.append(next((c.label for c in loose if c.positive and c.label), None) or fallback_label)
    return prompts, names


def refine_image(engine: "Engine", loaded: LoadedImage, config: LabelConfig, smart: SmartPrompt,
                 phrases: tuple[str, ...] | None, model_version: str,
                 polygon: PolygonParams = PolygonParams(), thresholds: "DetectThresholds | None" = None,
                 options: PredictOptions = PredictOptions(), default_box: float = 0.0) -> tuple[dict, RegionStats]:
    """One LS prediction for one image from its smart-tool prompt (``phrases``: text + clicks).

    ``thresholds``: the request's detector thresholds for the text part (None: the engine's own);
    its detections keep only those whose label clears its own threshold (``model_score_threshold``,
    else ``options.box_threshold``, else ``default_box``), as text-only predictions do. ``options``
    also gives the region kinds. The masks themselves are never filtered by score or area: the
    annotator asked for each one."""
    width, height = loaded.width, loaded.height
    detections, selection = None, Selection()
    if phrases:
        detected = engine.detect([loaded.image], [phrases], [thresholds] if thresholds else None)[0]
        detections = above_own_threshold(detected, config, options, default_box, selection)
    fallback = (config.brush or config.bitmask or config.polygon or config.rectangle).labels[0]
    prompts, names = plan_prompts(smart, detections, width, height, fallback)
    # ``loaded.pixels``, not the image: a click on an image whose embedding is cached never decodes it
    outputs = engine.refine(loaded.pixels, loaded.sha256, prompts)
    stats, kept = RegionStats(dropped=selection.dropped), []
    for (mask, score), name in zip(outputs, names):
        if mask.is_empty:
            continue
        # A smart region's label belongs to the smart control (KeyPointLabels/RectangleLabels), a
        # detection's phrase to the prompt: both reach the output controls' labels the way a phrase
        # does (alias, exact, case, word overlap), and one that reaches none is dropped.
        label = config.map_phrase(name)
        if label is None:
            stats.dropped_phrases[name] = stats.dropped_phrases.get(name, 0) + 1
            selection.drop(DropReason.UNMAPPED)
            continue
        # SAM's IoU estimate can stray outside [0, 1]; a region score is a confidence, so clip it.
        kept.append(PromptedMask(label=label, mask=mask, score=min(max(score, 0.0), 1.0)))
    kept.sort(key=lambda item: item.score, reverse=True)  # best first; stable, so ties keep prompt order
    prediction = build_mask_prediction(LabeledMasks(width, height, tuple(kept)), config, model_version, polygon,
                                       options.output_kinds())
    stats.regions = len(prediction["result"])
    return prediction, stats
