"""Smart-tool refinement: clicks and boxes (and optionally a text prompt) → SAM masks → regions.

- Boxes: each smart rectangle becomes one mask, refined by the clicks that fall inside it.
- Clicks outside every box: one mask from all of them (positive and negative together).
- Text + clicks: the text prompt's detections, each refined by the clicks inside its box.
Each region keeps the label of the smart region that made it (a click's or box's own label; with
text, the detection's phrase). SAM's best of three candidate masks by predicted IoU is returned as
``brushlabels`` plus, when the config has ``RectangleLabels``, the mask's bounding rectangle.
Empty masks are dropped; no mask at all is an empty result, not an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from backend.images.fetch import LoadedImage
from backend.ls.labelconfig import LabelConfig
from backend.ls.regions import RegionStats, build_prediction, percent_to_pixels
from backend.engine.results import Detections, ImageResult, MaskPrompt
from backend.ls.smartprompt import BoxPrompt, Click, SmartPrompt

if TYPE_CHECKING:
    from backend.engine.engine import Engine


def _points(clicks: list[Click], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    points = np.array([percent_to_pixels(c.x, c.y, width, height) for c in clicks], np.float64).reshape(-1, 2)
    return points, np.array([1 if c.positive else 0 for c in clicks], np.int64)


def _box_pixels(box: BoxPrompt, width: int, height: int) -> np.ndarray:
    x0, y0 = percent_to_pixels(box.x0, box.y0, width, height)
    x1, y1 = percent_to_pixels(box.x1, box.y1, width, height)
    return np.clip(np.array([x0, y0, x1, y1], np.float64), 0, [width, height, width, height])


def plan_prompts(smart: SmartPrompt, detections: Detections | None, width: int, height: int,
                 fallback_label: str) -> tuple[list[MaskPrompt], list[str]]:
    """The SAM prompts for one image and the label of each."""
    prompts, labels = [], []
    if detections is not None:  # text + clicks: each detection takes the clicks inside its pixel box
        points, point_labels = _points(list(smart.clicks), width, height)
        for (x0, y0, x1, y1), phrase in zip(detections.boxes, detections.phrases):
            inside = ((points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1))
            prompts.append(MaskPrompt(np.array([x0, y0, x1, y1], np.float64), points[inside], point_labels[inside]))
            labels.append(phrase)
        return prompts, labels
    used: set[int] = set()
    for box in smart.boxes:
        inside = [i for i, c in enumerate(smart.clicks) if box.contains(c)]
        used.update(inside)
        prompts.append(MaskPrompt(_box_pixels(box, width, height),
                                  *_points([smart.clicks[i] for i in inside], width, height)))
        labels.append(box.label or fallback_label)
    loose = [c for i, c in enumerate(smart.clicks) if i not in used]
    if any(c.positive for c in loose):
        prompts.append(MaskPrompt(None, *_points(loose, width, height)))
        labels.append(next((c.label for c in loose if c.positive and c.label), None) or fallback_label)
    return prompts, labels


def refine_image(engine: "Engine", loaded: LoadedImage, config: LabelConfig, smart: SmartPrompt,
                 phrases: tuple[str, ...] | None, model_version: str) -> tuple[dict, RegionStats]:
    """One LS prediction for one image from its smart-tool prompt (``phrases``: text + clicks)."""
    width, height = loaded.width, loaded.height
    detections = engine.detect([loaded.image], [phrases])[0] if phrases else None
    fallback = (config.brush or config.rectangle).labels[0]
    prompts, labels = plan_prompts(smart, detections, width, height, fallback)
    outputs = engine.refine(loaded.image, loaded.sha256, prompts)
    # SAM's IoU estimate can stray outside [0, 1]; a region score is a confidence, so clip it.
    kept = [(mask, min(max(score, 0.0), 1.0), label) for (mask, score), label in zip(outputs, labels)
            if not mask.is_empty]
    kept.sort(key=lambda item: item[1], reverse=True)  # best first; stable, so ties keep prompt order
    result = ImageResult(
        width=width, height=height,
        detections=Detections(boxes=np.array([mask.box() for mask, _, _ in kept], np.float32).reshape(-1, 4),
                              scores=np.array([score for _, score, _ in kept], np.float32),
                              phrases=tuple(label for _, _, label in kept)),
        masks=tuple(mask for mask, _, _ in kept))
    return build_prediction(result, config, model_version)
