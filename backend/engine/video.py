"""The video engine's loading: TRACKER_MODEL → a :class:`~backend.engine.tracker.VideoTracker`
on the deployment's device and dtype, every failure one :class:`ModelLoadError`."""

from __future__ import annotations

import logging

from backend.engine.device import configure_device, resolve_device, resolve_dtype
from backend.engine.families import load_error, require_family
from backend.engine.tracker import VideoTracker
from backend.modelinfo import TRACKER_FAMILIES

log = logging.getLogger(__name__)


def build_tracker(settings) -> VideoTracker:
    """Load TRACKER_MODEL (a SAM 2.1 video checkpoint: hub id or directory). Raises ModelLoadError."""
    require_family("TRACKER_MODEL", settings.tracker_model, TRACKER_FAMILIES)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    configure_device(device, settings.flush_denormals)
    log.info("loading the video tracker on %s (%s): %s", device, dtype, settings.tracker_model)
    try:
        return VideoTracker(settings.tracker_model, device, dtype)
    except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear state
        raise load_error("TRACKER_MODEL", settings.tracker_model, exc) from exc
