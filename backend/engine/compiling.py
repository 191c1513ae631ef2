"""COMPILE=1: ``torch.compile`` with shape buckets, so a new image size does not recompile.

What is compiled: DINO's Swin backbone and SAM's ViT image encoder, the two image encoders that
hold most of the arithmetic. torch.compile specializes a graph on input shapes, and these see few:
DINO's canvas depends only on the image's orientation, SAM's input is always its padded square,
and the batch is rounded up to a power-of-two bucket here (padding rows are copies of the last
image, dropped after the forward). Without COMPILE batches keep their own size.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Distinct graphs per compiled function: 2 DINO canvases x batch buckets (1, 2, 4, ... 32).
GRAPH_LIMIT = 16


def batch_bucket(count: int, cap: int) -> int:
    """Next power of two >= count, at most ``cap`` (which is itself always a bucket)."""
    if count < 1:
        raise ValueError(f"batch of {count} items: a batch needs at least one")
    bucket = 1 << (count - 1).bit_length()
    return min(bucket, max(cap, count))


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat the last row along dim 0 until there are ``rows`` rows (a no-op when already there)."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def maybe_compile(function: Callable, enabled: bool, name: str) -> Callable:
    """``torch.compile(function)`` with static shapes when enabled, else ``function`` itself."""
    if not enabled:
        return function
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, GRAPH_LIMIT)
    log.info("compiling %s (first batches of each shape bucket are slow)", name)
    return torch.compile(function, dynamic=False)
