"""SAM's low-resolution mask logits → compact full-size masks, on the model's device.

This is ``SamImageProcessor.post_process_masks`` (bilinear upsample to the padded square, crop
the padding, bilinear upsample to the original size, threshold), or with ``square=None``
``Sam2ImageProcessor.post_process_masks`` (SAM 2 stretches the image to its square without
padding: bilinear upsample straight to the original size, threshold), done where the logits already
are, a bounded number of masks at a time, and returning each mask as the crop of its foreground's
bounding box (:class:`CompactMask`), so only that crop crosses to the host.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from backend.results import CompactMask

# Upsampling buffers of one chunk stay under this: 41 masks at 1080p, 4 at 24 MP.
DEFAULT_BUDGET_BYTES = 512 * 2**20


def chunk_size(height: int, width: int, square: int | None, budget_bytes: int) -> int:
    """Masks upsampled at once so that their float32 buffers fit ``budget_bytes`` (at least 1);
    ``square=None``: no intermediate square stage (SAM 2)."""
    per_mask = 4 * (height * width + (square or 0) ** 2) + height * width  # float stage(s) + bool
    return max(1, budget_bytes // per_mask)


def _bounds(masks: torch.Tensor) -> torch.Tensor:
    """(C, H, W) bool → (C, 4) int64 [top, bottom, left, right) of each foreground; zeros if empty."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (C, H), (C, W)
    height, width = rows.shape[1], cols.shape[1]
    top = rows.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum
    bottom = height - rows.flip(1).to(torch.uint8).argmax(dim=1)
    left = cols.to(torch.uint8).argmax(dim=1)
    right = width - cols.flip(1).to(torch.uint8).argmax(dim=1)
    bounds = torch.stack([top, bottom, left, right], dim=1)
    return torch.where(rows.any(dim=1, keepdim=True), bounds, torch.zeros_like(bounds))


def upsample_masks(logits: torch.Tensor, square: int | None, reshaped_size: tuple[int, int] | None,
                   original_size: tuple[int, int], *, threshold: float = 0.0,
                   budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[CompactMask]:
    """(N, h, w) decoder logits of one image → N compact (H, W) masks of the original image.

    ``square``: side of SAM's padded input (1024); ``reshaped_size``: (rh, rw) of the resized image
    inside it; ``original_size``: (H, W) of the EXIF-transposed image. Runs on ``logits.device``.
    ``square=None`` (SAM 2: the input is the whole image stretched, no padding to crop): the
    logits go straight to the original size and ``reshaped_size`` is not used.
    """
    height, width = original_size
    step = chunk_size(height, width, square, budget_bytes)
    masks: list[CompactMask] = []
    for start in range(0, logits.shape[0], step):
        chunk = logits[start:start + step, None].float()  # (C, 1, h, w)
        if square is not None:
            chunk = F.interpolate(chunk, (square, square), mode="bilinear", align_corners=False)
            chunk = chunk[..., : reshaped_size[0], : reshaped_size[1]]
        chunk = F.interpolate(chunk, (height, width), mode="bilinear", align_corners=False)
        binary = chunk[:, 0] > threshold  # (C, H, W) bool
        del chunk
        masks.extend(_to_host(binary))
    return masks


def _to_host(binary: torch.Tensor) -> list[CompactMask]:
    """(C, H, W) bool on the device → C compact masks; two device→host copies for the whole chunk."""
    height, width = binary.shape[1:]
    bounds = _bounds(binary).cpu().tolist()
    crops = [binary[i, top:bottom, left:right].reshape(-1) for i, (top, bottom, left, right) in enumerate(bounds)]
    flat = torch.cat(crops).cpu().numpy() if crops else np.zeros(0, bool)
    masks, offset = [], 0
    for top, bottom, left, right in bounds:
        size = (bottom - top) * (right - left)
        if size == 0:
            masks.append(CompactMask.empty(height, width))
        else:
            crop = flat[offset:offset + size].reshape(bottom - top, right - left)
            masks.append(CompactMask(height, width, top, left, crop))
        offset += size
    return masks
