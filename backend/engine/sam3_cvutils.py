"""Stand-ins for the ``kernels-community/cv-utils`` kernels that SAM 3's video model uses.

transformers' ``Sam3VideoModel`` (5.23) takes two post-processing steps from a hub kernel fetched
at run time through the optional ``kernels`` package: ``generic_nms`` (the detector's mask NMS,
``det_nms_thresh`` = 0.1 mask IoU, within each prompt) and ``cc_2d`` (connected components, for
filling holes and removing sprinkles under ``fill_hole_area`` pixels in the low-resolution masks).
Offline, without ``kernels``, or on a CPU the kernel is missing and transformers skips both steps
with a warning: every overlapping duplicate detection of an object then starts its own track.

:func:`install` puts :class:`CvUtils` where transformers looks for the kernel (the module global
``cv_utils_kernel`` of ``modeling_sam3_video``, whose documented states are None = not tried yet,
False = failed, an object = loaded) when the real kernel cannot be had, so the model runs both
steps as the original SAM 3 does. Process-wide; a loaded real kernel is left alone.

- ``generic_nms``: greedy NMS on a precomputed IoU matrix, as SAM 3's ``generic_nms_cpu``: by
  score, highest first; a detection whose IoU with a kept one is above the threshold is dropped.
- ``cc_2d``: 8-connected components (as cc_torch) with OpenCV on the host, per mask.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

log = logging.getLogger(__name__)


class CvUtils:
    """The two kernel functions ``modeling_sam3_video`` calls, in torch + OpenCV."""

    @staticmethod
    def generic_nms(ious: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                    use_iou_matrix: bool = True) -> torch.Tensor:
        """(N, N) IoU matrix and (N,) scores → int64 indices of the kept detections (on their device)."""
        if not use_iou_matrix:
            raise ValueError("generic_nms here takes a precomputed IoU matrix: call it with use_iou_matrix=True")
        if ious.dim() != 2 or ious.shape[0] != ious.shape[1] or scores.shape != (ious.shape[0],):
            raise ValueError(f"generic_nms needs an (N, N) IoU matrix and (N,) scores, got {tuple(ious.shape)} "
                             f"and {tuple(scores.shape)}")
        overlaps = ious.float().cpu().numpy()
        order = np.argsort(-scores.float().cpu().numpy(), kind="stable")
        kept = []
        while order.size:
            best = int(order[0])
            kept.append(best)
            order = order[1:][overlaps[best, order[1:]] <= iou_threshold]
        return torch.tensor(kept, dtype=torch.int64, device=scores.device)

    @staticmethod
    def cc_2d(masks: torch.Tensor, get_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) uint8 masks → (labels, counts), both (N, 1, H, W) int32 on the masks' device:
        each foreground pixel's 8-connected component (1-based per mask) and that component's area;
        0 on the background."""
        if masks.dim() != 4 or masks.shape[1] != 1:
            raise ValueError(f"cc_2d needs (N, 1, H, W) masks, got {tuple(masks.shape)}")
        host = (masks[:, 0] != 0).to(torch.uint8).cpu().numpy()
        labels = np.zeros(host.shape, np.int32)
        counts = np.zeros(host.shape, np.int32)
        for i, mask in enumerate(host):
            _, labels[i], stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
            areas = stats[:, cv2.CC_STAT_AREA].astype(np.int32)
            areas[0] = 0  # label 0 is the background
            counts[i] = areas[labels[i]]
        device = masks.device
        return torch.from_numpy(labels)[:, None].to(device), torch.from_numpy(counts)[:, None].to(device)


def install() -> str:
    """Make ``Sam3VideoModel`` run NMS and hole filling: the hub kernel when ``kernels`` loads it,
    else :class:`CvUtils`. Returns which one it uses ("kernel" or "fallback")."""
    from transformers.models.sam3_video import modeling_sam3_video as sam3_video
    from transformers.utils import is_kernels_available

    if sam3_video.cv_utils_kernel is None and is_kernels_available():
        sam3_video._load_cv_utils_kernel_once()  # noqa: SLF001 - the model's own loader, tried once
    if sam3_video.cv_utils_kernel and not isinstance(sam3_video.cv_utils_kernel, CvUtils):
        return "kernel"
    if not isinstance(sam3_video.cv_utils_kernel, CvUtils):
        log.info("SAM 3 video: kernels-community/cv-utils is not available; its NMS and hole filling run "
                 "in torch + OpenCV instead")
        sam3_video.cv_utils_kernel = CvUtils()
    return "fallback"
