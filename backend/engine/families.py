"""Model families: a checkpoint's ``model_type`` → the class that runs it, and clear load errors.

A checkpoint's family is read from its config (``AutoConfig``: a local directory or a hub id),
never guessed from its name. Every way a setting can fail to give a model is raised as a
:class:`~backend.errors.ModelLoadError` naming the setting and the fix, so the backend can report
it (/health, 503, a worker's exit status) instead of failing each request with a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

from backend.errors import ModelLoadError
from backend.modelinfo import DETECTOR_FAMILIES, SAM3_FAMILIES, SEGMENTER_FAMILIES

log = logging.getLogger(__name__)

_HUB_FIX = ("set it to a local checkpoint directory, or to a hub id this host can download "
            "(gated models need HF_TOKEN and an accepted licence)")


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists() or source.count("/") > 1


def checkpoint_type(setting: str, source: str) -> str:
    """The ``model_type`` of the checkpoint ``source`` (hub id or directory) named by ``setting``."""
    from transformers import AutoConfig

    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(setting, source, "no such directory",
                             "point it at a checkpoint directory (one with config.json) or use a hub id")
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        if Path(source).is_dir():
            raise ModelLoadError(setting, source, "the directory holds no readable config.json",
                                 "point it at a saved checkpoint (save_pretrained writes config.json)") from exc
        raise ModelLoadError(setting, source, "cannot be downloaded or found in the local cache", _HUB_FIX) from exc
    except ValueError as exc:  # a config whose model_type this transformers does not know
        raise ModelLoadError(setting, source, f"is not a checkpoint this transformers can read ({_first_line(exc)})",
                             "use a checkpoint of a supported family (README: Engines and checkpoints)") from exc
    return config.model_type


def require_family(setting: str, source: str, families: dict[str, str]) -> str:
    """``checkpoint_type`` that must be one of ``families`` (model_type → family word)."""
    model_type = checkpoint_type(setting, source)
    if model_type not in families:
        raise ModelLoadError(setting, source, f"is a {model_type!r} checkpoint, which {setting} does not take",
                             f"use a checkpoint of type {', '.join(repr(t) for t in families)}")
    return model_type


def segmenter_class(model_type: str):
    """SAM_MODEL's class for a model_type of :data:`SEGMENTER_FAMILIES`."""
    if model_type == "sam_hq":
        from backend.engine.samhq import SamHQSegmenter

        return SamHQSegmenter
    if model_type == "sam2":
        from backend.engine.sam2 import Sam2Segmenter

        return Sam2Segmenter
    from backend.engine.segmenter import SamSegmenter

    return SamSegmenter


def load_error(setting: str, source: str, exc: BaseException) -> ModelLoadError:
    """A ModelLoadError for an exception raised while loading ``source``'s weights."""
    if isinstance(exc, ModelLoadError):
        return exc
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return ModelLoadError(setting, source, "too little memory to load it",
                              "free the device, use a smaller checkpoint or DTYPE=bfloat16, or set DEVICE=cpu")
    return ModelLoadError(setting, source, f"could not be loaded ({type(exc).__name__}: {_first_line(exc)})",
                          "check that the directory holds a complete checkpoint of its family (weights and "
                          "processor config) or re-download it")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


__all__ = ["checkpoint_type", "require_family", "segmenter_class", "load_error",
           "DETECTOR_FAMILIES", "SEGMENTER_FAMILIES", "SAM3_FAMILIES"]
