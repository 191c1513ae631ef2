"""Device, dtype and batch-size choices of the engine, made once when the models load."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
CPU_BATCH_SIZE = 8  # BATCH_SIZE=auto on the CPU: batching saves little there, memory is plentiful
MAX_AUTO_BATCH_SIZE = 32  # past this, batches add latency and memory but no throughput on an H100
AUTO_TOLERANCE = 0.03  # BATCH_SIZE=auto takes the smallest batch within 3 % of the fastest one's images/s
AUTO_STOP_BELOW = 0.9  # ... and stops timing larger batches once one is 10 % slower than the best so far
AUTO_TIMED_RUNS = 3  # timed runs per batch size, after one untimed warm-up run
AUTO_BUDGET_S = 60.0  # no new batch size is timed after this many seconds of probing


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

    CUDA: TF32 (:func:`enable_tf32`), and no transformers shape checks that make the host wait.
    CPU, with ``flush_denormals`` (``FLUSH_DENORMALS``, default on): subnormal floats (below
    ~1.2e-38) are treated and returned as zero. On x86 every operation on a subnormal takes a
    microcode assist, and SAM's image encoder makes many of them (softmax
    tails in its global attention, the padding below a landscape image): a 1920x1080 image took
    117 s instead of 8.7 s for the ViT-B encoder on 2 cores (``bench/denormal_bench.py``). The flag
    lives in each thread's MXCSR register and threads inherit it when they are created, so it must be
    set before torch starts its CPU thread pool, i.e. before the first parallel operation of the
    process: the engine calls this first thing, and in a process that already ran torch work it
    reaches only the calling thread (harmless, just less effective).
    """
    enable_tf32(device)
    if device.type == "cuda":
        # transformers' torch_compilable_check: in Grounding DINO a `(shapes).sum() == length` test
        # on a device tensor in each of its 12 deformable-attention layers, i.e. 12 host syncs per
        # forward. Our own preprocessing builds those shapes, so the check can never fail here.
        # An operator's explicit TRANSFORMERS_DISABLE_TORCH_CHECK=0 keeps the checks.
        os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
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


@dataclass(frozen=True)
class BatchChoice:
    """What BATCH_SIZE=auto decided: ``size``, the memory ``cap`` it was picked under, and the
    measured throughput per tried size (images/s, ascending sizes; empty on the CPU)."""

    size: int
    cap: int
    images_per_s: dict[int, float] = field(default_factory=dict)

    def table(self) -> str:
        """``1: 5.1, 2: 8.0, ...`` images/s, for logs and bench output."""
        return ", ".join(f"{size}: {rate:.1f}" for size, rate in self.images_per_s.items()) or "not timed"


def candidate_sizes(cap: int) -> list[int]:
    """The batch sizes BATCH_SIZE=auto times: powers of two up to ``cap``, plus ``cap`` itself.

    Powers of two because throughput changes slowly with the batch: a doubling is the smallest step
    worth a timed run. Ascending, without repeats. (COMPILE=1 then compiles 1 and the chosen size.)
    """
    if cap < 1:
        raise ValueError(f"batch size cap {cap}: it must be at least 1 (one image per batch)")
    sizes = [1 << power for power in range(cap.bit_length()) if 1 << power <= cap]
    return sizes if sizes[-1] == cap else [*sizes, cap]


def fastest_batch_size(candidates: Sequence[int], measure: Callable[[int], float], *,
                       tolerance: float = AUTO_TOLERANCE, stop_below: float = AUTO_STOP_BELOW,
                       budget_s: float | None = None,
                       clock: Callable[[], float] = time.perf_counter) -> tuple[int, dict[int, float]]:
    """Time ``candidates`` in ascending order with ``measure(size) -> images/s``; pick the fastest.

    The choice is the smallest size within ``tolerance`` (a fraction: 0.03 = 3 %) of the best
    throughput, because a smaller batch means less latency per request and less memory for the same
    speed. Probing stops growing (bounded start-up time) once a size reaches less than
    ``stop_below`` of the best throughput so far (throughput rises with the batch, then flattens and
    falls: larger sizes will not win), when ``measure`` returns 0 or less (the size does not run,
    e.g. out of memory: larger ones will not either), or when ``budget_s`` seconds of ``clock`` have
    passed since the start (checked before each size after the first).

    Returns the choice and the throughput table {size: images/s} of the sizes measured.
    """
    sizes = sorted(set(candidates))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch size candidates {list(candidates)}: give at least one size, all >= 1")
    if not 0 <= tolerance < 1 or not 0 < stop_below <= 1:
        raise ValueError(f"tolerance {tolerance} must be in [0, 1) and stop_below {stop_below} in (0, 1]")
    started = clock()
    table: dict[int, float] = {}
    for size in sizes:
        if table and budget_s is not None and clock() - started >= budget_s:
            log.info("BATCH_SIZE=auto: probing budget of %.0f s spent; not timing batch %d and above", budget_s, size)
            break
        rate = table[size] = measure(size)
        if rate <= 0 or rate < stop_below * max(table.values()):
            break
    best = max(table.values())
    if best <= 0:
        return sizes[0], table  # nothing ran: the smallest size is the safest
    return min(size for size, rate in table.items() if rate >= (1 - tolerance) * best), table


def measure_throughput(device: torch.device, forward: Callable[[int], None], batch_size: int, *,
                       runs: int = AUTO_TIMED_RUNS) -> float:
    """Images/s of ``forward(batch_size)``: one untimed warm-up run, then ``runs`` timed runs.

    The device is synchronized around the timed runs so queued CUDA work is counted (a no-op on the
    CPU). On CUDA an out-of-memory error returns 0.0 (the size does not run) after freeing the cache.
    """
    if runs < 1:
        raise ValueError(f"runs={runs}: time at least one run")
    try:
        forward(batch_size)  # warm-up: cuDNN/cuBLAS algorithm choice, allocator growth
        _sync(device)
        started = time.perf_counter()
        for _ in range(runs):
            forward(batch_size)
        _sync(device)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        return 0.0
    return batch_size * runs / max(time.perf_counter() - started, 1e-9)


def time_batch_sizes(device: torch.device, forward: Callable[[int], None], cap: int, *,
                     budget_s: float | None = AUTO_BUDGET_S, runs: int = AUTO_TIMED_RUNS) -> BatchChoice:
    """The fastest of :func:`candidate_sizes` ``(cap)`` by :func:`measure_throughput` of ``forward``."""
    size, table = fastest_batch_size(candidate_sizes(cap), lambda b: measure_throughput(device, forward, b, runs=runs),
                                     budget_s=budget_s)
    return BatchChoice(size, cap, table)


def eager_probing():
    """Context in which functions wrapped by ``torch.compile`` run eagerly (``force_eager`` stance).

    With COMPILE=1 probing would otherwise compile a graph for every batch size it tries (minutes
    each on real models), for sizes the server may never use. Eager throughput ranks batch sizes
    nearly as compiled throughput does, and eager peak memory is an upper bound for the compiled
    one. A no-op context where torch has no ``torch.compiler.set_stance`` (before 2.6).
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def probe_batch_size(device: torch.device, forward: Callable[[int], None], *,
                     budget_s: float | None = AUTO_BUDGET_S) -> BatchChoice:
    """BATCH_SIZE=auto: the fastest batch that fits the free device memory.

    ``forward(b)`` must run the largest per-batch work the engine does (DINO on its largest canvas,
    SAM's encoder and decoder) on ``b`` dummy images. On CUDA: peak memory at batch 1 and 2 gives
    the memory cap (the largest batch, <= 32, in 80 % of free memory), then :func:`time_batch_sizes`
    picks the fastest size up to the cap (about ``budget_s`` seconds at most). Everything runs under
    :func:`eager_probing`. On the CPU, :data:`CPU_BATCH_SIZE` without probing: timing real models
    there takes minutes per size and batching gains little.
    """
    if device.type != "cuda":
        return BatchChoice(CPU_BATCH_SIZE, CPU_BATCH_SIZE)
    with eager_probing():
        one, two = measure_peak_bytes(device, forward, 1), measure_peak_bytes(device, forward, 2)
        per_image = max(two - one, 1)
        free, _total = torch.cuda.mem_get_info(device)
        cap = batch_size_for_memory(free, max(one - per_image, 0), per_image)
        choice = time_batch_sizes(device, forward, cap, budget_s=budget_s)
    log.info("BATCH_SIZE=auto: %d, the fastest within %.0f %% (images/s by batch: %s; memory cap %d: peak %.0f MiB "
             "at batch 1, +%.0f MiB per image, %.0f MiB free)", choice.size, 100 * AUTO_TOLERANCE, choice.table(),
             cap, one / 2**20, per_image / 2**20, free / 2**20)
    return choice


def auto_batch_size(device: torch.device, forward: Callable[[int], None]) -> int:
    """BATCH_SIZE=auto: the size :func:`probe_batch_size` picks (see there)."""
    return probe_batch_size(device, forward).size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
