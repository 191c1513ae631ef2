"""Which detections of one image become regions, and under which label: the thresholds and caps
that live in Label Studio (the label config and the project's ``extra_params``) and in the env.

Two halves, both pure (numpy only, no models):

- :func:`request_thresholds`: the detector thresholds for a request. The detector's box threshold
  is the LOWEST score any label of the config may need: ``min(options.box_threshold or
  BOX_THRESHOLD, every model_score_threshold in the output controls)``, so a label whose threshold
  is below the project's still gets its boxes; :func:`select_detections` then applies each label's
  own threshold. Lowering the detector's threshold never changes which boxes above the old one it
  keeps (greedy NMS only lets a higher score suppress a box; ``max_detections`` keeps the best).
- :func:`select_detections`: the engine's result for one image → the kept detections, each with
  its config label and the region kinds it is written as. Steps, in order:

  1. phrase → config label (``LabelConfig.map_phrase``, once per detection); no label: dropped;
  2. per output kind (rectangle / brush / polygon / bitmask) whose control has the label and that the
     project's ``outputs`` allow: the score must EXCEED that control's threshold for the label.
     Precedence, most specific first: ``<Label model_score_threshold>`` → the control's
     ``model_score_threshold`` → ``options.box_threshold`` → ``BOX_THRESHOLD``. A detection that
     passes for no kind is dropped;
  3. mask area (foreground pixels) below ``options.min_mask_area`` / ``MIN_MASK_AREA`` (pixels
     when >= 1, else a fraction of the image): dropped;
  4. at most ``options.max_per_label`` / ``MAX_DETECTIONS_PER_LABEL`` per label, best scores first.

Smart-tool masks (``LabeledMasks``) do not come through here: the annotator asked for each of them
with a click or a box, so no score threshold, area or cap drops them.

Coordinates are untouched: boxes stay ``(4,)`` XYXY float32 pixels of the EXIF-transposed image,
masks stay :class:`CompactMask` in that frame. May import: ``labelconfig``, ``options`` of this
package and the foundation modules ``backend.results`` and ``backend.settings``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from backend.ls.labelconfig import ControlSpec, LabelConfig
from backend.ls.options import OUTPUT_KINDS, PredictOptions
from backend.results import CompactMask, Detections, ImageResult
from backend.settings import DetectThresholds, Settings


class DropReason(enum.Enum):
    """Why a detection yields no region (the value, for logs; :attr:`key`, for metrics)."""

    UNMAPPED = "its phrase maps to no label"
    BELOW_THRESHOLD = "score not above its label's threshold"
    NOT_IN_OUTPUTS = "its label's controls are not in outputs"
    SMALL_MASK = "mask smaller than the minimum area"
    LABEL_CAP = "over the maximum per label"

    @property
    def key(self) -> str:
        """The ``reason`` label of ``gsam_dropped_detections_total``."""
        return _DROP_KEYS[self]


_DROP_KEYS = {DropReason.UNMAPPED: "no_label", DropReason.BELOW_THRESHOLD: "threshold",
              DropReason.NOT_IN_OUTPUTS: "not_in_outputs", DropReason.SMALL_MASK: "area",
              DropReason.LABEL_CAP: "per_label_cap"}


@dataclass(frozen=True)
class SelectDefaults:
    """The deployment's selection settings (the env), used where the request's options are unset.

    The defaults select everything (no threshold above the detector's, no minimum area, no cap):
    what callers that only map phrases to labels (the CLI, benchmarks) get.
    """

    box_threshold: float = 0.0
    min_mask_area: float = 0.0  # pixels when >= 1, else a fraction of the image
    max_per_label: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "SelectDefaults":
        return cls(settings.box_threshold, settings.min_mask_area, settings.max_detections_per_label)


@dataclass(frozen=True)
class Selected:
    """One kept detection: its config label, box ``(4,)`` XYXY float32 pixels, mask, score, and the
    region kinds (of :data:`OUTPUT_KINDS`) it is written as."""

    label: str
    box: np.ndarray
    mask: CompactMask
    score: float
    kinds: tuple[str, ...]


@dataclass
class Selection:
    """The kept detections of one image (best score first) and what was dropped, and why."""

    kept: list[Selected] = field(default_factory=list)
    dropped: dict[DropReason, int] = field(default_factory=dict)
    unmapped_phrases: dict[str, int] = field(default_factory=dict)  # phrase -> detections dropped

    def drop(self, reason: DropReason, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


def output_controls(config: LabelConfig, options: PredictOptions) -> list[tuple[str, ControlSpec]]:
    """``(kind, control)`` of every output control the config has and ``options.outputs`` allows.

    ``LabelConfig`` names its controls after the output kinds (``rectangle``, ``brush``, ``polygon``,
    ``bitmask``), so one loop covers every kind.
    """
    allowed = options.output_kinds()
    controls = [(kind, getattr(config, kind, None)) for kind in OUTPUT_KINDS if kind in allowed]
    return [(kind, control) for kind, control in controls if control is not None]


def request_thresholds(config: LabelConfig, options: PredictOptions, base: DetectThresholds) -> DetectThresholds:
    """The detector thresholds for a request: its options over ``base`` (the env's), with the box
    threshold lowered to the lowest ``model_score_threshold`` of the output controls."""
    box = base.box if options.box_threshold is None else options.box_threshold
    for _, control in output_controls(config, options):
        box = min([box] + control.score_thresholds())
    return DetectThresholds(
        box=box,
        text=base.text if options.text_threshold is None else options.text_threshold,
        nms=base.nms if options.nms_threshold is None else options.nms_threshold,
        max_detections=base.max_detections if options.max_detections is None else options.max_detections)


def _kinds(label: str, score: np.float32, controls: list[tuple[str, ControlSpec]], default: float,
           selection: Selection) -> tuple[str, ...]:
    """The kinds whose control has ``label`` and whose threshold ``score`` exceeds (dropped: counted).

    Compared in float32, as the detector compares its scores: a threshold the detector ran at
    keeps here exactly what the detector kept."""
    having = [(kind, control) for kind, control in controls if label in control.labels]
    if not having:
        selection.drop(DropReason.NOT_IN_OUTPUTS)
        return ()
    kinds = []
    for kind, control in having:
        threshold = control.threshold_for(label)
        if score > np.float32(default if threshold is None else threshold):
            kinds.append(kind)
    if not kinds:
        selection.drop(DropReason.BELOW_THRESHOLD)
    return tuple(kinds)


def above_own_threshold(detections: Detections, config: LabelConfig, options: PredictOptions,
                        default_box: float, selection: Selection | None = None) -> Detections:
    """The detections whose label clears its own threshold for at least one output control (the
    detector ran at the lowest threshold any label needs: see :func:`request_thresholds`).

    For smart tools with text, whose detections become SAM prompts without :func:`select_detections`.
    A phrase that maps to no label is kept: the caller drops it, counted, when it maps its masks.
    ``selection``: where the drops are counted (its ``dropped``), if given."""
    controls = output_controls(config, options)
    default = default_box if options.box_threshold is None else options.box_threshold
    counted = selection if selection is not None else Selection()
    keep = [index for index, (phrase, score) in enumerate(zip(detections.phrases, detections.scores))
            if (label := config.map_phrase(phrase)) is None
            or _kinds(label, np.float32(score), controls, default, counted)]
    return Detections(detections.boxes[keep], detections.scores[keep], tuple(detections.phrases[i] for i in keep))


def select_detections(result: ImageResult, config: LabelConfig, options: PredictOptions = PredictOptions(),
                      defaults: SelectDefaults = SelectDefaults()) -> Selection:
    """The detections of one image that become regions (see the module docstring for the steps)."""
    selection = Selection()
    detections = result.detections
    controls = output_controls(config, options)
    default_threshold = defaults.box_threshold if options.box_threshold is None else options.box_threshold
    min_pixels = options.min_area_pixels(defaults.min_mask_area, result.width, result.height)
    cap = options.max_per_label if options.max_per_label is not None else defaults.max_per_label
    per_label: dict[str, int] = {}
    # Best first, so the cap keeps the top scores; stable, so ties keep the detector's order.
    for index in np.argsort(-np.asarray(detections.scores, np.float64), kind="stable"):
        phrase, score = detections.phrases[index], np.float32(detections.scores[index])
        label = config.map_phrase(phrase)
        if label is None:
            selection.unmapped_phrases[phrase] = selection.unmapped_phrases.get(phrase, 0) + 1
            selection.drop(DropReason.UNMAPPED)
            continue
        kinds = _kinds(label, score, controls, default_threshold, selection)
        if not kinds:
            continue
        mask = result.masks[index]
        if min_pixels > 0 and mask_area(mask) < min_pixels:
            selection.drop(DropReason.SMALL_MASK)
            continue
        if cap is not None and per_label.get(label, 0) >= cap:
            selection.drop(DropReason.LABEL_CAP)
            continue
        per_label[label] = per_label.get(label, 0) + 1
        selection.kept.append(Selected(label, detections.boxes[index], mask, float(score), kinds))
    return selection


def mask_area(mask: CompactMask) -> int:
    """Foreground pixels of a mask (only its crop can hold any)."""
    return int(np.count_nonzero(mask.crop))
