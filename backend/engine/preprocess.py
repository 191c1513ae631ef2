"""Image preprocessing split between the host and the device.

The host half (``to_canvas``, run in the pipeline's threads) resizes with PIL exactly as the
transformers ``*ImageProcessorPil`` processors do and pastes the result, still uint8, into the
top-left of the model's fixed canvas. The device half (``Normalizer``) rescales, normalizes and
zeroes the padding on the GPU. So the host handles 3 bytes per pixel instead of building float32
arrays (the processors' float math was ~2/3 of their time), and 4x fewer bytes cross to the GPU.
Results match the processors' up to float rounding (they normalize in float64).

On CUDA the threads that fill the canvases (pinned memory) also start their copies to the device,
on a side stream: the pipeline prepares images up to two batches ahead, so the next batch's pixels
cross while the device computes the current one, and the engine thread only makes its stream wait
for them (on the device, never on the host).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from backend.errors import ImageError


@dataclass(frozen=True)
class Canvas:
    """pixels: (H, W, 3) uint8, the resized image in rows [0, h) and columns [0, w), zeros elsewhere;
    resized: (h, w). For a CUDA model also ``on_device``, the same pixels on the device, copied on
    :func:`copy_stream` and complete once ``copied`` (an event on that stream) has passed."""

    pixels: torch.Tensor
    resized: tuple[int, int]
    on_device: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape[:2])  # type: ignore[return-value]


def to_canvas(image: Image.Image, resized: tuple[int, int], canvas: tuple[int, int], resample, *,
              device: torch.device | None = None) -> Canvas:
    """Resize an RGB image to ``resized`` (h, w) with PIL's ``resample`` and paste it into a zero
    (H, W) canvas. ``resized`` must fit the canvas. ``device``: the model's; a CUDA one gets the
    canvas in pinned memory and its copy started now, on :func:`copy_stream` (thread-safe: the
    pipeline's preparing threads call this ahead of the engine)."""
    (height, width), (canvas_h, canvas_w) = resized, canvas
    if not (1 <= height <= canvas_h and 1 <= width <= canvas_w):
        # A sliver (4000x1) rounds to 0 pixels on its short side, or (extreme ratios) overflows the
        # canvas: the models cannot take it. An ImageError fails this image's task alone.
        raise ImageError(f"the image is {image.width}x{image.height} pixels, too thin for the models (resized for "
                         f"their {canvas_w}x{canvas_h} input it would be {width}x{height}): crop or pad it")
    cuda = device is not None and device.type == "cuda"
    tensor = torch.zeros((canvas_h, canvas_w, 3), dtype=torch.uint8, pin_memory=cuda)
    tensor.numpy()[:height, :width] = np.asarray(image.resize((width, height), resample))
    if not cuda:
        return Canvas(tensor, resized)
    side = copy_stream(device)
    with torch.cuda.stream(side):  # the current stream is per thread: this thread's copies go there
        on_device = tensor.to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(side)
    return Canvas(tensor, resized, on_device, copied)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host → device; through pinned memory and a non-blocking copy on CUDA, so the copy overlaps."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype=dtype, non_blocking=True)


@functools.cache
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream host→device copies of model inputs run on (one per CUDA device, made once)."""
    return torch.cuda.Stream(device)


def upload(canvases: list[Canvas], device: torch.device) -> torch.Tensor:
    """The canvases' pixels as one (B, H, W, 3) uint8 batch on ``device``.

    CUDA: canvases whose copies :func:`to_canvas` started are only waited for by the current
    stream (on the device) and stacked there. Others (made without the device) are copied now, one
    non-blocking copy each on :func:`copy_stream`, into a batch allocated on that stream, which the
    current stream then waits for: either way the host never waits for an upload."""
    if device.type != "cuda":
        return torch.stack([c.pixels for c in canvases]).to(device)
    main, side = torch.cuda.current_stream(device), copy_stream(device)
    if all(c.on_device is not None for c in canvases):
        for canvas in canvases:
            main.wait_event(canvas.copied)
            canvas.on_device.record_stream(main)  # allocated on the side stream, read on this one
        return torch.stack([c.on_device for c in canvases])
    with torch.cuda.stream(side):
        batch = torch.empty((len(canvases), *canvases[0].pixels.shape), dtype=torch.uint8, device=device)
        for row, canvas in zip(batch, canvases):
            pixels = canvas.pixels if canvas.pixels.is_pinned() else canvas.pixels.pin_memory()
            row.copy_(pixels, non_blocking=True)
    main.wait_stream(side)
    batch.record_stream(main)  # allocated on the side stream, used and freed on the current one
    return batch


class Normalizer:
    """The processor's rescale + normalize, on a batch of canvases on the device.

    ``__call__(canvases, device, dtype)`` → pixels (B, 3, H, W) in ``dtype`` with zeros outside
    each image (as the processors pad after normalizing), and valid (B, H, W) bool (True = image).
    """

    def __init__(self, image_processor):
        self.rescale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        mean = image_processor.image_mean if image_processor.do_normalize else [0.0, 0.0, 0.0]
        std = image_processor.image_std if image_processor.do_normalize else [1.0, 1.0, 1.0]
        # Python floats, not tensors: a constant tensor would be a host→device copy on every call.
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, canvases: list[Canvas], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        batch = upload(canvases, device)  # (B, H, W, 3) uint8
        sizes = to_device(torch.tensor([c.resized for c in canvases]), device)  # (B, 2)
        height, width = batch.shape[1:3]
        rows = torch.arange(height, device=device)[None, :, None] < sizes[:, 0, None, None]
        cols = torch.arange(width, device=device)[None, None, :] < sizes[:, 1, None, None]
        valid = rows & cols  # (B, H, W)
        pixels = batch.permute(0, 3, 1, 2).float() * self.rescale
        for channel, (mean, std) in enumerate(zip(self.mean, self.std)):  # float32 math, as with tensors
            pixels[:, channel].sub_(mean).div_(std)
        pixels = torch.where(valid[:, None], pixels, torch.zeros((), device=device))
        return pixels.to(dtype), valid
