"""Which model families the backend runs, and the ``model_version`` that names them (torch-free).

The family of a checkpoint is its config's ``model_type`` (never its name): SAM_MODEL takes
``sam``, ``sam_hq`` and ``sam2``; GROUNDING_DINO_MODEL takes ``grounding-dino`` and
``mm-grounding-dino``; SAM3_MODEL takes ``sam3_video`` (the hub checkpoint) and ``sam3``. The engine reads the type through transformers
(hub ids too, see :mod:`backend.engine.families`); this module only reads a local directory's
``config.json``, so the web process can name the models without importing torch or transformers.

Foundation module: imports nothing of the backend but ``settings`` and ``errors``.
"""

from __future__ import annotations

import json
from pathlib import Path

from backend.settings import EngineKind, Settings

#: model_type → the word that names the family in ``model_version`` (for local directories).
SEGMENTER_FAMILIES = {"sam": "sam", "sam_hq": "hq", "sam2": "sam2"}
DETECTOR_FAMILIES = {"grounding-dino": "grounding-dino", "mm-grounding-dino": "mm"}
# The hub's facebook/sam3 is a ``sam3_video`` checkpoint (detector + tracker); a bare ``sam3`` one
# (detector only) passes the family check and fails at load for want of the tracker.
SAM3_FAMILIES = {"sam3_video": "sam3", "sam3": "sam3"}
# TRACKER_MODEL (video projects): the hub's SAM 2.1 checkpoints are ``sam2_video`` ones; a ``sam2``
# (image) checkpoint holds the same weights but not the memory modules.
TRACKER_FAMILIES = {"sam2_video": "sam2-video"}


def local_model_type(source: str) -> str | None:
    """``model_type`` of a local checkpoint directory's config.json; None for a hub id, a missing
    directory or an unreadable config (the engine reports those when it loads)."""
    config = Path(source) / "config.json"
    try:
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def checkpoint_name(source: str, families: dict[str, str]) -> str:
    """The last path part of a hub id or directory; for a local directory whose name does not say
    its family, the family word is put in front ('hq-mysam', 'sam2-checkpoint')."""
    name = source.rstrip("/").split("/")[-1] or source
    model_type = local_model_type(source)
    word = families.get(model_type or "")
    if word and word not in name.lower():
        return f"{word}-{name}"
    return name


def model_version(settings: Settings) -> str:
    """``MODEL_VERSION`` if set, else the models' names: 'grounding-dino-tiny+sam-vit-huge',
    'grounding-dino-tiny+sam2.1-hiera-large', 'sam3'."""
    if settings.model_version:
        return settings.model_version
    if settings.engine is EngineKind.SAM3:
        return checkpoint_name(settings.sam3_model, SAM3_FAMILIES)
    return "+".join([checkpoint_name(settings.grounding_dino_model, DETECTOR_FAMILIES),
                     checkpoint_name(settings.sam_model, SEGMENTER_FAMILIES)])


def model_sources(settings: Settings) -> dict[str, str]:
    """The settings naming the models this deployment loads, for /health and log lines."""
    if settings.engine is EngineKind.SAM3:
        return {"SAM3_MODEL": settings.sam3_model}
    return {"GROUNDING_DINO_MODEL": settings.grounding_dino_model, "SAM_MODEL": settings.sam_model,
            "TRACKER_MODEL": settings.tracker_model}
