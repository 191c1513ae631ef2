"""COMPILE=1: regional ``torch.compile`` with two batch buckets and a persistent cache, done at load.

What is compiled: the repeated blocks of the image encoders, the bulk of the arithmetic (SAM's and
SAM-HQ's ViT layers, SAM 2's Hiera blocks, the Swin layers of Grounding DINO's backbone, SAM 3's
ViT layers), each block on its own (:func:`compile_blocks`), not whole models. All instances of a
block class run one code object, so Dynamo traces and Inductor builds one graph per distinct
block configuration (e.g. SAM's windowed and global-attention layers: 2 graphs for 32 layers),
which is what makes a cold compile take tens of seconds instead of minutes. The glue between the
blocks (patch embedding, necks, DINO's deformable attention and text fusion) stays eager.

Shapes: torch.compile specializes on input shapes (``dynamic=False``), so each compiled shape
costs a compile. DINO's canvas depends only on the image's orientation and SAM's input is always
its padded square, so only the batch varies, and it is rounded up to one of two buckets
(:func:`batch_bucket`): 1 (a click, a single task) or the worker's BATCH_SIZE (bulk batches; a
smaller straggler is padded up with copies of its last image, dropped after the forward). Without
COMPILE batches keep their own size.

Start-up: the engines run every bucket once at load (:func:`warm_buckets`), so a worker that says
it is serving never compiles on a request. With COMPILE_CACHE_DIR Inductor's caches (FX graph
cache, compiled kernels) live there (:func:`use_compile_cache`), in a folder per torch/Triton
version and device, so a restarted worker reuses the previous start's artifacts (Dynamo still
traces; Inductor's code generation and the C++/Triton builds are skipped).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from backend.errors import ModelLoadError

log = logging.getLogger(__name__)

#: Dynamo's cache entries per code object. Compiled blocks share one (``nn.Module._call_impl``),
#: and each block configuration x input shape is one entry: real Swin-T has 4 stages x 2 shift
#: variants x 2 canvases x 2 batch buckets = 32; SAM adds 2 x 2, SAM 2 (Hiera) about 4 x 2 x 2.
#: Past the limit Dynamo runs new shapes eagerly (slower, never wrong).
GRAPH_LIMIT = 64


def batch_buckets(cap: int) -> list[int]:
    """The batch sizes a compiled encoder sees: 1 and ``cap`` (the configured batch size)."""
    if cap < 1:
        raise ValueError(f"batch size {cap}: BATCH_SIZE must be at least 1")
    return sorted({1, cap})


def batch_bucket(count: int, cap: int) -> int:
    """The bucket a batch of ``count`` items is padded to: 1 for one item, else ``cap`` (a batch
    larger than ``cap`` keeps its size: callers chunk by ``cap``, so it does not happen)."""
    if count < 1:
        raise ValueError(f"batch of {count} items: a batch needs at least one")
    return 1 if count == 1 else max(cap, count)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat the last row along dim 0 until there are ``rows`` rows (a no-op when already there)."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def block_classes(root: nn.Module) -> list[type[nn.Module]]:
    """The repeated block classes under ``root``: the classes of the children of its ``ModuleList``s,
    innermost only (Swin's ``SwinStage`` holds a list of ``SwinLayer``: the layers are the blocks),
    torch's own layers (``Linear``, ``Conv2d``) excluded."""
    classes = {type(child) for module in root.modules() if isinstance(module, nn.ModuleList) for child in module
               if not type(child).__module__.startswith("torch.")}

    def holds_another(cls: type[nn.Module]) -> bool:
        return any(type(inner) in classes and type(inner) is not cls
                   for module in root.modules() if type(module) is cls for inner in module.modules())

    return sorted((cls for cls in classes if not holds_another(cls)), key=lambda cls: cls.__name__)


def compile_blocks(root: nn.Module, name: str) -> int:
    """``block.compile(dynamic=False)`` for every block of :func:`block_classes` ``(root)``, in
    place; returns how many. Compiling is lazy: each block configuration compiles on its first call
    with a new shape (see :func:`warm_buckets`).

    Raises ValueError when ``root`` has no repeated blocks (the model is not one this was written
    for: compile its encoder's root module, the one holding the ``layers``/``blocks`` list)."""
    classes = block_classes(root)
    if not classes:
        raise ValueError(f"{name}: {type(root).__name__} holds no ModuleList of blocks to compile; pass the "
                         "encoder module whose layers are repeated (e.g. SAM's vision_encoder)")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, GRAPH_LIMIT)
    blocks = [module for module in root.modules() if type(module) in classes]
    for block in blocks:
        block.compile(dynamic=False)
    log.info("COMPILE: %s: %d blocks (%s) compiled regionally", name, len(blocks),
             ", ".join(cls.__name__ for cls in classes))
    return len(blocks)


def warm_buckets(probe: Callable[[int], None], cap: int, name: str) -> float:
    """Run ``probe(batch)`` for each of :func:`batch_buckets` ``(cap)``, so that every shape the
    compiled blocks will see is compiled now, at load, and not on a request. Returns the seconds."""
    started = time.perf_counter()
    for batch in batch_buckets(cap):
        probe(batch)
    seconds = time.perf_counter() - started
    log.info("COMPILE: %s compiled and warmed for batches %s in %.1f s", name, batch_buckets(cap), seconds)
    return seconds


def cache_key(device: torch.device) -> str:
    """The folder name for one torch build, Triton version and device, e.g.
    ``torch-2.13.0+cu128-triton-3.7.1-NVIDIA_H100_80GB_HBM3``: Inductor's artifacts (kernels built
    for one GPU architecture, C++ built for one CPU) are valid only there."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"torch-{torch.__version__}-triton-{triton}-{where}")


def use_compile_cache(directory: str | os.PathLike, device: torch.device) -> Path:
    """COMPILE_CACHE_DIR: keep Inductor's caches in ``directory/<cache_key(device)>`` (created) with
    the FX graph cache on. Call before the first compiled call; returns the folder.

    Raises ModelLoadError (naming COMPILE_CACHE_DIR and the fix) when the folder cannot be written."""
    folder = Path(directory).expanduser().resolve() / cache_key(device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".writable-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ModelLoadError("COMPILE_CACHE_DIR", str(directory), f"cannot write {folder} ({exc.strerror})",
                             "point it at a writable directory (a volume of the worker's) or unset it") from exc
    import torch._inductor.config as inductor_config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # Inductor reads it at each lookup
    inductor_config.fx_graph_cache = True
    log.info("COMPILE: Inductor cache in %s", folder)
    return folder
