"""Smart-tool context → clicks and boxes for SAM.

Label Studio sends the annotator's smart-tool regions in ``context.result``: ``keypointlabels``
(a click; ``is_positive`` false for a negative click) and ``rectanglelabels`` (a box), in percent of
the image LS displays, each with its own label. A click without ``is_positive`` counts as positive
(LS omits the flag when the smart tool has no negative mode). ``image_rotation`` is only how the
annotator rotated the view; region coordinates stay in the image's own frame, so it is ignored.
A rectangle keeps its LS fields, rotation included (:class:`PercentRect`); coordinates stay in
percent here, and only ``geometry.py`` turns them into pixels once the image's size is known (a
rotated rectangle becomes the axis-aligned pixel box around it).

Every other region type is skipped without being looked into: a mask (``brushlabels`` RLE, or the
``bitmasklabels`` PNG data URL that a smart ``<BitmaskLabels>`` stroke sends) is not a prompt, so a
context holding only masks asks for nothing (``tasks.asks_for_nothing``), for brush and bitmask alike.

May import: ``labelconfig`` and ``geometry`` of this package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backend.ls.geometry import PercentRect, PixelBox
from backend.ls.labelconfig import LabelConfig


@dataclass(frozen=True)
class Click:
    x: float  # percent of the displayed image width
    y: float  # percent of its height
    positive: bool
    label: str | None


@dataclass(frozen=True)
class BoxPrompt:
    """A smart rectangle as LS sent it (percent, possibly rotated) and its label."""

    rect: PercentRect
    label: str | None

    def pixel_box(self, width: int, height: int) -> PixelBox:
        """Its axis-aligned (x0, y0, x1, y1) pixel bounds on a ``width x height`` image (unclipped)."""
        return self.rect.pixel_box(width, height)


@dataclass(frozen=True)
class SmartPrompt:
    clicks: tuple[Click, ...] = ()
    boxes: tuple[BoxPrompt, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.clicks or self.boxes)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _label(value: dict, kind: str) -> str | None:
    labels = value.get(kind)
    return labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None


def _click(item: dict) -> Click | None:
    value = item.get("value") or {}
    x, y = _number(value.get("x")), _number(value.get("y"))
    if x is None or y is None:
        return None
    return Click(x=x, y=y, positive=item.get("is_positive", True) is not False,
                 label=_label(value, "keypointlabels"))


def _box(item: dict) -> BoxPrompt | None:
    value = item.get("value") or {}
    x, y, w, h = (_number(value.get(k)) for k in ("x", "y", "width", "height"))
    if None in (x, y, w, h) or w <= 0 or h <= 0:
        return None
    rect = PercentRect(x=x, y=y, width=w, height=h, rotation=_number(value.get("rotation")) or 0.0)
    return BoxPrompt(rect=rect, label=_label(value, "rectanglelabels"))


def parse_smart_prompt(context: dict | None, config: LabelConfig) -> SmartPrompt:
    """The clicks and boxes in ``context.result`` that target the config's image."""
    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list):
        return SmartPrompt()
    clicks, boxes = [], []
    for item in results:
        if not isinstance(item, dict) or item.get("to_name", config.image_name) != config.image_name:
            continue
        if item.get("type") == "keypointlabels" and (click := _click(item)):
            clicks.append(click)
        elif item.get("type") == "rectanglelabels" and (box := _box(item)):
            boxes.append(box)
    return SmartPrompt(clicks=tuple(clicks), boxes=tuple(boxes))
