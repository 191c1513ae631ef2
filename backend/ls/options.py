"""Per-project prediction options: what an LS admin types as ``extra_params`` in the model
connection form (sent to ``/setup``), validated into :class:`PredictOptions`.

Every field is optional: ``None`` means "the deployment's default" (the env var, see
:mod:`backend.settings`). More specific settings in the label config (``model_score_threshold`` on a
control or a ``<Label>``) win over these; these win over the env. Foundation-only imports.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from backend.settings import EngineKind

#: Region kinds a project may ask for (``outputs``); the config's controls decide which exist at all.
OUTPUT_KINDS = ("rectangle", "brush", "polygon", "bitmask")
MAX_PROMPT_CHARS = 2000
#: The engines a project may choose (``extra_params.engine``): :class:`backend.settings.EngineKind`'s values.
ENGINE_NAMES = tuple(kind.value for kind in EngineKind)
MAX_VERSION_CHARS = 200


_SHOWN = reprlib.Repr()  # attributes, not keyword arguments: Python 3.11 has no Repr(**limits)
_SHOWN.maxstring = _SHOWN.maxother = 40
_SHOWN.maxlist = _SHOWN.maxdict = 6
_SHOWN.maxlevel = 2


def _shown(value: Any) -> str:
    """A value in an error message: short, whatever an admin (or an attacker) sent."""
    return _SHOWN.repr(value)


class OptionsError(ValueError):
    """``extra_params`` cannot be used; the message names the field and what to fix (HTTP 400)."""


def _unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise OptionsError(f"extra_params.{name} must be a number in [0, 1], not {_shown(value)}")
    return float(value)


def _count(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise OptionsError(f"extra_params.{name} must be an integer in [1, {high}], not {_shown(value)}")
    return value


def check_min_mask_area(name: str, value: Any) -> float:
    """A minimum mask area: pixels (>= 1) or a fraction of the image (0 <= value < 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or value > 1e9:
        raise OptionsError(f"{name} must be a number of pixels (>= 1) or a fraction of the image (< 1), "
                           f"not {_shown(value)}")
    return float(value)


@dataclass(frozen=True)
class PredictOptions:
    """One project's options (``None``: the deployment default).

    ``min_mask_area``: pixels when >= 1, else a fraction of the image's pixels. ``outputs``: the
    region kinds to answer with (a subset of :data:`OUTPUT_KINDS`; None: every kind the config has).
    ``engine`` / ``model_version``: which engine answers the project (None: the deployment's default);
    whether one is served is the mode's to check (:meth:`backend.modes.base.Backend.check_choice`).
    """

    box_threshold: float | None = None
    text_threshold: float | None = None
    nms_threshold: float | None = None
    max_detections: int | None = None
    max_per_label: int | None = None
    min_mask_area: float | None = None
    polygon_tolerance: float | None = None
    prompt: str | None = None
    outputs: tuple[str, ...] | None = None
    engine: str | None = None
    model_version: str | None = None

    @classmethod
    def from_json(cls, params: Any) -> "PredictOptions":
        """From ``extra_params`` (a JSON object, or null/empty for no options). Unknown keys are an
        error, so a typo is not silently ignored."""
        if params is None or params == "" or params == {}:
            return cls()
        if not isinstance(params, dict):
            raise OptionsError("extra_params must be a JSON object, e.g. {\"box_threshold\": 0.35}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(params) - known)
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            shown = [key if len(key) <= 40 else key[:40] + "..." for key in unknown[:5]]
            raise OptionsError(f"extra_params has unknown keys {shown}{more}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name in ("box_threshold", "text_threshold", "nms_threshold"):
            if params.get(name) is not None:
                values[name] = _unit(name, params[name])
        if params.get("max_detections") is not None:
            values["max_detections"] = _count("max_detections", params["max_detections"], 1000)
        if params.get("max_per_label") is not None:
            values["max_per_label"] = _count("max_per_label", params["max_per_label"], 1000)
        if params.get("min_mask_area") is not None:
            values["min_mask_area"] = check_min_mask_area("extra_params.min_mask_area", params["min_mask_area"])
        tolerance = params.get("polygon_tolerance")
        if tolerance is not None:
            if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 100:
                raise OptionsError("extra_params.polygon_tolerance must be pixels in [0, 100], "
                                   f"not {_shown(tolerance)}")
            values["polygon_tolerance"] = float(tolerance)
        prompt = params.get("prompt")
        if prompt is not None:
            if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
                raise OptionsError(f"extra_params.prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
            values["prompt"] = prompt.strip() or None
        outputs = params.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list) or not outputs or any(o not in OUTPUT_KINDS for o in outputs):
                raise OptionsError(f"extra_params.outputs must be a non-empty list of {list(OUTPUT_KINDS)}, "
                                   f"not {_shown(outputs)}")
            values["outputs"] = tuple(dict.fromkeys(outputs))
        engine = params.get("engine")
        if engine is not None:
            if not isinstance(engine, str) or engine.strip().lower() not in ENGINE_NAMES:
                raise OptionsError(f"extra_params.engine must be one of {list(ENGINE_NAMES)}, not {_shown(engine)}")
            values["engine"] = engine.strip().lower()
        version = params.get("model_version")
        if version is not None:
            if not isinstance(version, str) or not version.strip() or len(version) > MAX_VERSION_CHARS:
                raise OptionsError("extra_params.model_version must be a model version the backend serves "
                                   f"(GET /versions), not {_shown(version)}")
            values["model_version"] = version.strip()
        return cls(**values)

    def to_json(self) -> dict:
        """The options that are set, as JSON (``from_json(to_json())`` gives them back)."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if "outputs" in data:
            data["outputs"] = list(data["outputs"])
        return data

    def output_kinds(self) -> tuple[str, ...]:
        """The region kinds to answer with: ``outputs``, else every kind."""
        return self.outputs if self.outputs is not None else OUTPUT_KINDS

    def tolerance(self, default: float) -> float:
        """The polygon tolerance in pixels: ``polygon_tolerance``, else ``default`` (the env's)."""
        return default if self.polygon_tolerance is None else self.polygon_tolerance

    def min_area_pixels(self, default: float, width: int, height: int) -> int:
        """The minimum mask area in pixels for a ``width`` x ``height`` image (``default`` when unset)."""
        area = default if self.min_mask_area is None else self.min_mask_area
        return int(math.ceil(area * width * height)) if area < 1 else int(area)
