"""Device, dtype and batch-size choices of the engine, made once when the models load."""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
CPU_BATCH_SIZE = 8  # BATCH_SIZE=auto on the CPU: batching saves little there, memory is plentiful
MAX_AUTO_BATCH_SIZE = 32  # past this, batches add latency and memory but no throughput on an H100


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """None = bfloat16 on CUDA (half the memory traffic, tensor cores), float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def enable_tf32(device: torch.device) -> None:
    """Let float32 matmuls and convolutions left in a bf16 model use TF32 tensor cores (CUDA only).

    Process-wide torch flags, set once when the engine loads; no effect on the CPU.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def configure_device(device: torch.device, flush_denormals: bool = True) -> None:
    """Process-wide torch flags for ``device``, set once when the engine loads, before its models.

    CUDA: TF32 (:func:`enable_tf32`). CPU, with ``flush_denormals`` (``FLUSH_DENORMALS``, default
    on): subnormal floats (below ~1.2e-38) are treated and returned as zero. On x86 every operation
    on a subnormal takes a microcode assist, and SAM's image encoder makes many of them (softmax
    tails in its global attention, the padding below a landscape image): a 1920x1080 image took
    117 s instead of 8.7 s for the ViT-B encoder on 2 cores (``bench/denormal_bench.py``). The flag
    lives in each thread's MXCSR register and threads inherit it when they are created, so it must be
    set before torch starts its CPU thread pool, i.e. before the first parallel operation of the
    process: the engine calls this first thing, and in a process that already ran torch work it
    reaches only the calling thread (harmless, just less effective).
    """
    enable_tf32(device)
    if device.type == "cpu" and flush_denormals and not torch.set_flush_denormal(True):
        log.info("this CPU cannot flush subnormal floats to zero (no SSE3): encoders may be slower")


def batch_size_for_memory(free_bytes: int, fixed_bytes: int, per_image_bytes: int, *, headroom: float = 0.8,
                          cap: int = MAX_AUTO_BATCH_SIZE) -> int:
    """The largest batch whose activations fit ``headroom`` of the free memory, in [1, cap].

    ``fixed_bytes``: peak memory of a forward that does not grow with the batch (beyond the
    weights, which are already counted as used); ``per_image_bytes``: what each image adds.
    """
    if per_image_bytes <= 0:
        return cap
    fits = int((free_bytes * headroom - fixed_bytes) // per_image_bytes)
    return max(1, min(cap, fits))


def measure_peak_bytes(device: torch.device, forward: Callable[[int], None], batch_size: int) -> int:
    """Peak device memory above the current allocation while ``forward(batch_size)`` runs."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward(batch_size)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def auto_batch_size(device: torch.device, forward: Callable[[int], None]) -> int:
    """BATCH_SIZE=auto: probe ``forward`` at batch 1 and 2 and fit the batch into free memory.

    ``forward(b)`` must run the largest per-batch work the engine does (DINO on its largest canvas,
    SAM's encoder and decoder) on ``b`` dummy images. On the CPU, :data:`CPU_BATCH_SIZE`.
    """
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    one, two = measure_peak_bytes(device, forward, 1), measure_peak_bytes(device, forward, 2)
    per_image = max(two - one, 1)
    free, _total = torch.cuda.mem_get_info(device)
    chosen = batch_size_for_memory(free, max(one - per_image, 0), per_image)
    log.info("BATCH_SIZE=auto: %d (peak %.0f MiB at batch 1, +%.0f MiB per image, %.0f MiB free)",
             chosen, one / 2**20, per_image / 2**20, free / 2**20)
    return chosen
