"""SAM's low-resolution mask logits → compact full-size masks, on the model's device.

This is ``SamImageProcessor.post_process_masks`` (bilinear upsample to the padded square, crop
the padding, bilinear upsample to the original size, threshold), or with ``square=None``
``Sam2ImageProcessor.post_process_masks`` (SAM 2 stretches the image to its square without
padding: bilinear upsample straight to the original size, threshold), done where the logits already
are, for a whole batch of images at once:

- the masks of all images with the same sizes are upsampled together, a bounded number at a time;
- each mask is bit-packed on the device (8 pixels a byte) next to its foreground's bounds;
- everything crosses to the host in one :class:`~backend.engine.transfer.HostCopy` (one wait per
  batch, none per image), where each mask becomes the crop of its foreground's bounding box
  (:class:`CompactMask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backend.engine.transfer import HostCopy
from backend.results import CompactMask

# Upsampling buffers of one chunk stay under this: 41 masks at 1080p, 4 at 24 MP.
DEFAULT_BUDGET_BYTES = 512 * 2**20
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.unpackbits' default (big-endian) bit order


def chunk_size(height: int, width: int, square: int | None, budget_bytes: int) -> int:
    """Masks upsampled at once so that their float32 buffers fit ``budget_bytes`` (at least 1);
    ``square=None``: no intermediate square stage (SAM 2)."""
    per_mask = 4 * (height * width + (square or 0) ** 2) + height * width  # float stage(s) + bool
    return max(1, budget_bytes // per_mask)


@dataclass(frozen=True)
class MaskJob:
    """The masks of one image to upsample.

    ``logits``: (N, h, w) decoder logits on the model's device; ``square``: side of SAM's padded
    input (1024), or None when the input is the whole image stretched (SAM 2, SAM 3, trackers: the
    logits go straight to the original size); ``reshaped_size``: (rh, rw) of the resized image inside
    the square (unused without a square); ``original_size``: (H, W) of the EXIF-transposed image.
    """

    logits: torch.Tensor
    square: int | None
    reshaped_size: tuple[int, int] | None
    original_size: tuple[int, int]

    @property
    def frame(self) -> tuple:
        """What decides the upsampling: jobs with equal frames are upsampled in one call."""
        reshaped = self.reshaped_size if self.square is not None else None
        return self.square, reshaped, self.original_size, tuple(self.logits.shape[1:])


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


def pack_bits(binary: torch.Tensor) -> torch.Tensor:
    """(C, H, W) bool → (C, H, ceil(W / 8)) uint8, 8 pixels a byte, the first the highest bit
    (``np.unpackbits``' order); the last byte of a row is padded with zeros."""
    width = binary.shape[-1]
    padded = F.pad(binary.to(torch.uint8), (0, -width % 8))
    bits = padded.view(*binary.shape[:-1], (width + 7) // 8, 8)
    packed = bits[..., 0] * _BIT_WEIGHTS[0]
    for bit in range(1, 8):  # a weighted sum in uint8: at most 255, no overflow
        packed += bits[..., bit] * _BIT_WEIGHTS[bit]
    return packed


def _upsample(logits: torch.Tensor, job: MaskJob, threshold: float) -> torch.Tensor:
    """(C, h, w) logits → (C, H, W) bool of the original image."""
    chunk = logits[:, None].float()  # (C, 1, h, w)
    if job.square is not None:
        chunk = F.interpolate(chunk, (job.square, job.square), mode="bilinear", align_corners=False)
        chunk = chunk[..., : job.reshaped_size[0], : job.reshaped_size[1]]
    chunk = F.interpolate(chunk, job.original_size, mode="bilinear", align_corners=False)
    return chunk[:, 0] > threshold


class PendingMasks:
    """Masks of a batch on their way to the host: :meth:`result` waits once and unpacks them.

    ``sizes`` and ``counts``: per job the (H, W) of its image and its number of masks. ``groups``:
    (member jobs, packed (M, H, ceil(W/8)) uint8, bounds (M, 4)), the M masks of the members one
    after the other, in member order. ``extras``: further device tensors (e.g. scores) to carry in
    the same copy; :meth:`result` returns them as host arrays after the masks."""

    def __init__(self, sizes: list[tuple[int, int]], counts: list[int],
                 groups: list[tuple[list[int], torch.Tensor, torch.Tensor]], extras: Sequence[torch.Tensor] = ()):
        self._sizes, self._counts = sizes, counts
        self._members = [members for members, _, _ in groups]
        self._copy = HostCopy([*(t for _, packed, bounds in groups for t in (packed, bounds)), *extras])

    def result(self) -> tuple[list[list[CompactMask]], list[np.ndarray]]:
        """Per job its N compact masks (in job order; none for a job without masks), and the extras."""
        arrays = self._copy.result()
        results: list[list[CompactMask]] = [[] for _ in self._sizes]
        for group, members in enumerate(self._members):
            packed, bounds = arrays[2 * group], arrays[2 * group + 1]
            offset = 0
            for job in members:
                height, width = self._sizes[job]
                results[job] = [_unpack(packed[row], bounds[row], height, width)
                                for row in range(offset, offset + self._counts[job])]
                offset += self._counts[job]
        return results, arrays[2 * len(self._members):]


def _unpack(packed: np.ndarray, bounds: np.ndarray, height: int, width: int) -> CompactMask:
    """(H, ceil(W/8)) packed rows and [top, bottom, left, right) → the compact mask."""
    top, bottom, left, right = (int(v) for v in bounds)
    if bottom <= top:
        return CompactMask.empty(height, width)
    first = left // 8
    bits = np.unpackbits(packed[top:bottom, first:(right + 7) // 8], axis=1)
    crop = bits[:, left - first * 8: right - first * 8].astype(bool)
    return CompactMask(height, width, top, left, crop)


def upsample_batch(jobs: Sequence[MaskJob], *, threshold: float = 0.0, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                   extras: Sequence[torch.Tensor] = ()) -> PendingMasks:
    """Upsample, threshold and pack every job's masks on the device, and start their copy to the host.

    Jobs of the same :attr:`MaskJob.frame` (a bulk batch of same-size images) are concatenated and
    upsampled ``chunk_size`` masks at a time, whatever image they come from. Returns at once (no
    wait on the device); :meth:`PendingMasks.result` gives per job its masks.
    """
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        if job.logits.shape[0]:
            groups.setdefault(job.frame, []).append(index)
    parts = []
    for members in groups.values():
        first = jobs[members[0]]
        height, width = first.original_size
        logits = torch.cat([jobs[i].logits for i in members]) if len(members) > 1 else first.logits
        step = chunk_size(height, width, first.square, budget_bytes)
        packed, bounds = [], []
        for start in range(0, logits.shape[0], step):
            binary = _upsample(logits[start:start + step], first, threshold)
            packed.append(pack_bits(binary))
            bounds.append(_bounds(binary))
            del binary
        parts.append((members, torch.cat(packed), torch.cat(bounds)))  # one copy per group, not per image
    return PendingMasks([job.original_size for job in jobs], [job.logits.shape[0] for job in jobs], parts, extras)


def upsample_masks(logits: torch.Tensor, square: int | None, reshaped_size: tuple[int, int] | None,
                   original_size: tuple[int, int], *, threshold: float = 0.0,
                   budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[CompactMask]:
    """(N, h, w) decoder logits of one image → N compact (H, W) masks (see :class:`MaskJob`)."""
    job = MaskJob(logits, square, reshaped_size, original_size)
    return upsample_batch([job], threshold=threshold, budget_bytes=budget_bytes).result()[0][0]


def binary_to_masks(binary: torch.Tensor) -> list[CompactMask]:
    """(C, H, W) bool on the device → C compact masks, with one wait."""
    height, width = binary.shape[1:]
    pending = PendingMasks([(height, width)], [binary.shape[0]], [([0], pack_bits(binary), _bounds(binary))])
    return pending.result()[0][0]
