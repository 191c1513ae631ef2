"""The project's label config: which tags we write to, which labels exist, and phrase → label mapping.

Parsing uses label-studio-sdk's ``LabelInterface``; this module only picks what the backend needs:
the ``<Image>`` the regions belong to, the ``<TextArea>`` that holds the prompt, and the
``<RectangleLabels>`` / ``<BrushLabels>`` / ``<PolygonLabels>`` / ``<BitmaskLabels>`` controls (any one of
them is enough) with their labels and ``predicted_values`` aliases, and the ``model_score_threshold``
of a control or of one ``<Label>`` (applied by ``selection.py``).

Video projects (a config with a ``<Video>`` and no ``<Image>``): ``<Video name value frameRate>``,
``<VideoRectangle name toName>`` (LS 1.23's only spatial video control; it has no labels of its
own) and ``<Labels toName>`` on the same video, whose labels LS merges into each
``videorectangle`` result (``from_name`` = the VideoRectangle's name). They fill the same fields as
an image project: ``image_name``/``image_value_key`` name the Video, ``rectangle`` is the
VideoRectangle's name with the ``<Labels>``' labels and thresholds, so the selection code
(thresholds, label mapping, caps) works unchanged on each frame's detections; :attr:`LabelConfig.video`
carries what only video needs (the frame rate). A config with both an ``<Image>`` and a ``<Video>``
is an image project, exactly as before video was supported (the Video is ignored).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

from typing import Any, Mapping

from label_studio_sdk.label_interface import LabelInterface

from backend.ls.videotime import frame_rate as _frame_rate

_WORD = re.compile(r"\w+")


class LabelConfigError(ValueError):
    """The label config cannot be used by this backend; the message says what the config needs."""


@dataclass(frozen=True)
class ControlSpec:
    """One labels control, e.g. ``<RectangleLabels name="label" toName="image">``.

    ``score_threshold``: the control's ``model_score_threshold`` (None: unset); ``label_thresholds``:
    ``(label, threshold)`` for each ``<Label>`` with its own. See :meth:`threshold_for`.
    """

    name: str
    to_name: str
    labels: tuple[str, ...]
    score_threshold: float | None = None
    label_thresholds: tuple[tuple[str, float], ...] = ()

    def threshold_for(self, label: str) -> float | None:
        """The score a detection of ``label`` must exceed for this control: the label's own
        ``model_score_threshold``, else the control's, else None (the request's or the env's)."""
        for name, threshold in self.label_thresholds:
            if name == label:
                return threshold
        return self.score_threshold

    def score_thresholds(self) -> list[float]:
        """Every threshold set on this control or its labels."""
        own = [] if self.score_threshold is None else [self.score_threshold]
        return own + [threshold for _, threshold in self.label_thresholds]


@dataclass(frozen=True)
class VideoSpec:
    """What only a video project needs. ``frame_rate``: the ``<Video frameRate>`` attribute as
    written (LS reads it case-insensitively: ``framerate`` too), ``"24"`` (LS's default) when
    absent; it may be ``$field``, read from each task's data (:meth:`fps`)."""

    frame_rate: str = "24"

    def fps(self, task_data: Mapping[str, Any] | None = None) -> float:
        """The frame rate LS uses for a task (frames/second, > 0): see :func:`backend.ls.videotime.frame_rate`."""
        return _frame_rate(self.frame_rate, task_data)


def normalize_phrase(text: str) -> str:
    """Lower-case and collapse whitespace: the form prompts and aliases are compared in."""
    return " ".join(text.lower().split())


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


@dataclass(frozen=True)
class LabelConfig:
    image_name: str
    image_value_key: str  # the task data key of the image, "image" for value="$image"
    prompt_name: str | None  # the <TextArea> whose text is the prompt, if the config has one
    rectangle: ControlSpec | None
    brush: ControlSpec | None
    labels: tuple[str, ...]  # union of the output controls' labels, in config order
    aliases: dict[str, str] = field(default_factory=dict)  # normalized predicted_value -> label
    xml: str = field(default="", repr=False, compare=False)  # the config as LS sent it (for queue payloads)
    polygon: ControlSpec | None = None  # <PolygonLabels>: every mask also yields its outline polygons
    bitmask: ControlSpec | None = None  # <BitmaskLabels>: every mask also as a PNG (backend.bitmask)
    video: VideoSpec | None = None  # set for a video project (image_name is then the <Video>'s name)

    @property
    def is_video(self) -> bool:
        """True for a video project: ``rectangle`` is its ``<VideoRectangle>``, results are tracks."""
        return self.video is not None

    def default_phrases(self) -> list[str]:
        """The prompt used when the request carries none: every label, then every alias."""
        phrases = list(self.labels) + [alias for alias in self.aliases if alias not in self.labels]
        return list(dict.fromkeys(normalize_phrase(p) for p in phrases if p.strip()))

    def map_phrase(self, phrase: str) -> str | None:
        """Map a detected phrase to a config label, or ``None`` when nothing fits.

        Order: ``predicted_values`` alias, exact label, case-insensitive label, best word overlap
        (Jaccard of word sets against labels and aliases). A single-label config maps everything.
        """
        if len(self.labels) == 1:
            return self.labels[0]
        normalized = normalize_phrase(phrase)
        if normalized in self.aliases:
            return self.aliases[normalized]
        if phrase in self.labels:
            return phrase
        for label in self.labels:
            if normalize_phrase(label) == normalized:
                return label
        return self._best_overlap(normalized)

    def _best_overlap(self, normalized: str) -> str | None:
        phrase_words = _words(normalized)
        if not phrase_words:
            return None
        candidates = [(label, label) for label in self.labels] + list(
            (alias, label) for alias, label in self.aliases.items()
        )
        best_label, best_score = None, 0.0
        for text, label in candidates:
            words = _words(text)
            score = len(phrase_words & words) / len(phrase_words | words) if words else 0.0
            if score > best_score:
                best_label, best_score = label, score
        return best_label


def _score_threshold(attrs: dict | None, where: str) -> float | None:
    """A ``model_score_threshold`` attribute: a number in [0, 1], or None when absent."""
    raw = (attrs or {}).get("model_score_threshold")
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        shown = str(raw)[:40]
        raise LabelConfigError(f'model_score_threshold="{shown}" on {where} is not a score: use a number '
                               'in [0, 1], e.g. model_score_threshold="0.45"')
    return value


def _control_spec(control) -> ControlSpec:
    where = f'<{control.tag} name="{control.name[:80]}">'  # names are the caller's text: bounded
    label_thresholds = []
    for label, tag in control.labels_attrs.items():
        threshold = _score_threshold(tag.attr, f'<Label value="{label[:80]}"> of {where}')
        if threshold is not None:
            label_thresholds.append((label, threshold))
    return ControlSpec(name=control.name, to_name=control.to_name[0], labels=tuple(control.labels),
                       score_threshold=_score_threshold(control.attr, where),
                       label_thresholds=tuple(label_thresholds))


def _aliases(controls) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for control in controls:
        for label, tag in control.labels_attrs.items():
            raw = (tag.attr or {}).get("predicted_values", "")
            for alias in raw.split(","):
                if alias.strip():
                    aliases.setdefault(normalize_phrase(alias), label)
    return aliases


@functools.lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse an LS label config. Raises :class:`LabelConfigError` when the backend cannot use it.

    Cached because LS sends the same config with every request; the result is immutable.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty: send the project's XML label config")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises many parser error types; all mean "not a usable config"
        raise LabelConfigError(f"the label config is not valid XML for Label Studio: {exc}") from None

    images = {obj.name: obj for obj in interface.objects if obj.tag == "Image"}
    if not images:
        videos = {obj.name: obj for obj in interface.objects if obj.tag == "Video"}
        if videos:
            return _video_config(interface, videos, xml)
        raise LabelConfigError("the label config has no <Image> or <Video> tag: this backend labels images "
                               "(<Image> with <RectangleLabels>/<BrushLabels>/<PolygonLabels>/<BitmaskLabels>) "
                               "and videos (<Video> with <VideoRectangle> and <Labels>)")
    by_tag: dict[str, list] = {}
    for control in interface.controls:
        if control.to_name and control.to_name[0] in images:
            by_tag.setdefault(control.tag, []).append(control)
    rectangles, brushes = by_tag.get("RectangleLabels", []), by_tag.get("BrushLabels", [])
    polygons, bitmasks = by_tag.get("PolygonLabels", []), by_tag.get("BitmaskLabels", [])
    if not rectangles and not brushes and not polygons and not bitmasks:
        raise LabelConfigError(
            "the label config has neither <RectangleLabels> nor <BrushLabels> nor <PolygonLabels> nor "
            "<BitmaskLabels> on an <Image>: add at least one of them so the backend has somewhere to put its regions"
        )
    rectangle = _control_spec(rectangles[0]) if rectangles else None
    brush = _control_spec(brushes[0]) if brushes else None
    polygon = _control_spec(polygons[0]) if polygons else None
    bitmask = _control_spec(bitmasks[0]) if bitmasks else None
    image_name = (rectangle or brush or polygon or bitmask).to_name
    # regions of one prediction must belong to one image: the first control's
    brush = brush if brush and brush.to_name == image_name else None
    polygon = polygon if polygon and polygon.to_name == image_name else None
    bitmask = bitmask if bitmask and bitmask.to_name == image_name else None
    controls = [c for c in (rectangles[:1] + brushes[:1] + polygons[:1] + bitmasks[:1]) if c.to_name[0] == image_name]
    labels = tuple(dict.fromkeys(label for control in controls for label in control.labels))
    if not labels:
        raise LabelConfigError("the <RectangleLabels>/<BrushLabels>/<PolygonLabels>/<BitmaskLabels> tags have no "
                               "<Label> children: add labels")
    prompts = [c for c in by_tag.get("TextArea", []) if c.to_name[0] == image_name]
    value = images[image_name].value or ""
    return LabelConfig(
        image_name=image_name,
        image_value_key=value.lstrip("$"),
        prompt_name=prompts[0].name if prompts else None,
        rectangle=rectangle,
        brush=brush,
        labels=labels,
        aliases=_aliases(controls),
        xml=xml,
        polygon=polygon,
        bitmask=bitmask,
    )


def _attr(tag, name: str) -> str | None:
    """An attribute of a tag, its name compared case-insensitively (LS lower-cases attribute names)."""
    for key, value in (tag.attr or {}).items():
        if key.lower() == name.lower():
            return value
    return None


def _video_config(interface: LabelInterface, videos: dict, xml: str) -> LabelConfig:
    """A video project's config (see the module docstring). The first ``<VideoRectangle>`` on a
    ``<Video>`` picks the video; the first ``<Labels>`` on that video with ``<Label>`` children
    gives the labels (LS too applies a track's label from the first labels control that has it)."""
    on_video: dict[str, list] = {}
    for control in interface.controls:
        if control.to_name and control.to_name[0] in videos:
            on_video.setdefault(control.tag, []).append(control)
    rectangles = on_video.get("VideoRectangle", [])
    if not rectangles:
        name = next(iter(videos))[:80]
        raise LabelConfigError(f'the label config has a <Video name="{name}"> but no <VideoRectangle> on it: add '
                               f'<VideoRectangle name="box" toName="{name}"/> so the backend has somewhere to put '
                               "its tracks")
    video_name = rectangles[0].to_name[0]
    labels_tags = [c for c in on_video.get("Labels", []) if c.to_name[0] == video_name and c.labels]
    if not labels_tags:
        raise LabelConfigError(f'the <VideoRectangle> on <Video name="{video_name[:80]}"> has no labels: add '
                               f'<Labels name="videoLabels" toName="{video_name[:80]}"> with <Label value="..."/> '
                               "children (a VideoRectangle has no labels of its own)")
    labels_spec = _control_spec(labels_tags[0])
    rectangle = ControlSpec(name=rectangles[0].name, to_name=video_name, labels=labels_spec.labels,
                            score_threshold=labels_spec.score_threshold,
                            label_thresholds=labels_spec.label_thresholds)
    prompts = [c for c in on_video.get("TextArea", []) if c.to_name[0] == video_name]
    frame_rate = _attr(videos[video_name], "frameRate")
    return LabelConfig(
        image_name=video_name,
        image_value_key=(videos[video_name].value or "").lstrip("$"),
        prompt_name=prompts[0].name if prompts else None,
        rectangle=rectangle,
        brush=None,
        labels=tuple(dict.fromkeys(labels_spec.labels)),
        aliases=_aliases(labels_tags[:1]),
        xml=xml,
        video=VideoSpec(frame_rate=frame_rate if isinstance(frame_rate, str) and frame_rate.strip() else "24"),
    )
