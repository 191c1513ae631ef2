"""Fused multi-scale deformable attention (MSDA) for Grounding DINO and MM-Grounding-DINO, in Triton.

transformers runs MSDA (``MultiScaleDeformableAttention``, the ``attn`` of every deformable attention
layer: 6 in the encoder, 6 in the decoder) as one ``grid_sample`` per level, a ``stack``, a multiply
and a sum. That writes, copies and reads an intermediate of queries x heads x head_dim x levels x
points (182 MB in bf16 per encoder layer and image at 800x1333) and does not get faster in bf16. The
kernel here reads each sampled corner straight from ``value`` and keeps the weighted sum in
registers: it writes only the output.

What it computes is exactly the PyTorch path's semantics:

- ``value`` (batch, sum of H_l*W_l, heads, head_dim), the levels one after the other (padding
  already zeroed by the caller, which is how the model applies its pixel mask);
- ``spatial_shapes`` (levels, 2) as (H_l, W_l), ``level_start_index`` (levels,);
- ``sampling_locations`` (batch, queries, heads, levels, points, 2) as (x, y) in [0, 1] of each
  level (values outside are allowed);
- ``attention_weights`` (batch, queries, heads, levels, points);
- bilinear sampling as ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``:
  pixel coordinate ``loc * size - 0.5``, corners outside the level read as zero;
- output (batch, queries, heads * head_dim) in ``value``'s dtype; the kernel accumulates in fp32.

Forward only (inference). fp32, bf16 and fp16; anything else (fp64, tensors that need gradients, a
CPU tensor) goes to transformers' own code.

Use: :func:`install_fused_msda` on a loaded model replaces the forward of each of its
``MultiScaleDeformableAttention`` modules when the model is on CUDA and Triton imports; elsewhere it
changes nothing and returns 0. Triton is optional: this module imports it only inside functions, so
CPU deployments and the web process run without it. The tests and ``bench/kernels.py --device cpu``
run the kernel on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
first imported).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

#: dtypes the kernel takes; others fall back to the PyTorch path.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: class name of transformers' MSDA module (Grounding DINO and MM-Grounding-DINO each have their
#: own copy of the class, under the same name).
MSDA_CLASS_NAME = "MultiScaleDeformableAttention"
_FUSED_ATTR = "_gsam_fused_msda"


def triton_available() -> bool:
    """Whether ``import triton`` works (the CUDA torch wheels ship it; the CPU wheel does not)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # a broken install: run the PyTorch path
        log.warning("triton is installed but does not import (%s): deformable attention stays in PyTorch", error)
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1`` when Triton loaded)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel():
    """The jitted kernel. Its module imports Triton, so it is imported on first use only; whether
    it runs in the interpreter is fixed then (``TRITON_INTERPRET``)."""
    from backend.engine.msda_kernel import msda_forward_kernel

    return msda_forward_kernel


def _next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _launch_config(num_queries: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_Q, num_warps). On a GPU 64 queries x 32 channels per program; in the interpreter,
    where every program is a round of numpy calls, as many queries as possible per program."""
    if interpreting():
        return min(_next_power_of_2(num_queries), 16384), 1
    block_q = 64 if head_dim <= 32 else 32
    return block_q, 4


def msda_triton(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention, forward, fused: the same inputs and result as
    :func:`msda_reference` (see the module's docstring for the layouts), in ``value``'s dtype.

    Needs Triton, and CUDA tensors unless Triton's interpreter is on (then CPU tensors)."""
    batch, seq_len, heads, head_dim = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (batch, queries, heads, levels, points, 2), "
                         f"got {tuple(sampling_locations.shape)}")
    loc_batch, queries, loc_heads, levels, points, _ = sampling_locations.shape
    if (loc_batch, loc_heads) != (batch, heads):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match value "
                         f"{tuple(value.shape)} in batch or heads")
    if tuple(attention_weights.shape) != (batch, queries, heads, levels, points):
        raise ValueError(f"attention_weights must be {(batch, queries, heads, levels, points)}, "
                         f"got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (levels, 2) or tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"spatial_shapes {tuple(spatial_shapes.shape)} / level_start_index "
                         f"{tuple(level_start_index.shape)} do not match {levels} levels")
    if value.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the fused kernel takes {KERNEL_DTYPES}, not {value.dtype}")
    output = torch.empty((batch, queries, heads * head_dim), dtype=value.dtype, device=value.device)
    if output.numel() == 0:
        return output.zero_()
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    spatial_shapes = spatial_shapes.to(value.device).contiguous()
    level_start_index = level_start_index.to(value.device).contiguous()
    block_q, num_warps = _launch_config(queries, head_dim)
    grid = ((queries + block_q - 1) // block_q, batch * heads)
    _kernel()[grid](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
        queries, seq_len,
        NUM_HEADS=heads, HEAD_DIM=head_dim, NUM_LEVELS=levels, NUM_POINTS=points,
        BLOCK_Q=block_q, BLOCK_D=_next_power_of_2(head_dim), num_warps=num_warps,
    )
    return output


def msda_reference(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The PyTorch path: transformers' own ``MultiScaleDeformableAttention.forward`` (grid_sample),
    called on a fresh module so that no installed kernel answers instead."""
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    shapes_list = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return MultiScaleDeformableAttention().forward(value, spatial_shapes, shapes_list, level_start_index,
                                                   sampling_locations, attention_weights, 64)


def _kernel_applies(value: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether one call can go to the kernel: a kernel dtype, a device the kernel runs on, and no
    gradients to compute (the kernel is forward-only)."""
    if value.dtype not in KERNEL_DTYPES:
        return False
    if value.device.type != "cuda" and not interpreting():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, *tensors)):
        return False
    return True


def _fused_forward(original: Callable) -> Callable:
    """A drop-in ``forward`` for one MultiScaleDeformableAttention module: the kernel when it
    applies, else the module's own forward."""

    def forward(value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                sampling_locations, attention_weights, im2col_step=64):
        if _kernel_applies(value, sampling_locations, attention_weights):
            return msda_triton(value, value_spatial_shapes, level_start_index, sampling_locations,
                               attention_weights)
        return original(value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                        sampling_locations, attention_weights, im2col_step)

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    return forward


def _msda_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(outer deformable-attention layer, its MultiScaleDeformableAttention) pairs of ``model``."""
    found = []
    for outer in model.modules():
        inner = getattr(outer, "attn", None)
        if isinstance(inner, torch.nn.Module) and type(inner).__name__ == MSDA_CLASS_NAME:
            found.append((outer, inner))
    return found


def self_check(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, levels: int,
               points: int) -> float:
    """Run the kernel once on small random inputs of this layout against :func:`msda_reference`
    (in fp32) and return the largest absolute difference; raises if the kernel does not compile."""
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[max(2, 11 >> level), max(3, 17 >> level)] for level in range(levels)])
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    seq_len, queries = int((shapes[:, 0] * shapes[:, 1]).sum()), 37
    value = torch.randn(1, seq_len, heads, head_dim, generator=generator)
    locations = torch.rand(1, queries, heads, levels, points, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(1, queries, heads, levels, points, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    args = [t.to(device) for t in (value, shapes, starts)] + [locations.to(device, dtype), weights.to(device, dtype)]
    args[0] = args[0].to(dtype)
    fused = msda_triton(*args).float()
    expected = msda_reference(*(t.float() if t.is_floating_point() else t for t in args))
    return float((fused - expected).abs().max())


def install_fused_msda(model: torch.nn.Module, *, force: bool = False) -> int:
    """Make every ``MultiScaleDeformableAttention`` of a loaded Grounding DINO / MM-Grounding-DINO
    ``model`` run the fused Triton kernel; returns how many modules run it (0: nothing changed).

    Installs only when the model is on CUDA in a kernel dtype and Triton imports, and after a
    one-off check of the kernel against the PyTorch path at the model's layout (compile errors or
    a mismatch: a warning, and the model keeps the PyTorch path). ``force=True`` skips the device
    test (the tests use it on the CPU under ``TRITON_INTERPRET=1``). The forward is replaced on
    each module instance: the class, other models and transformers' hub-kernel hook are untouched.
    Calling it again changes nothing more. Each call still falls back to transformers' code for
    tensors the kernel does not take (fp64, CPU, gradients)."""
    layers = _msda_layers(model)
    if not layers:
        return 0
    if all(getattr(inner, _FUSED_ATTR, False) for _, inner in layers):
        return len(layers)  # installed before
    parameter = next(model.parameters(), None)
    if parameter is None:
        return 0
    device, dtype = parameter.device, parameter.dtype
    if not force and (device.type != "cuda" or dtype not in KERNEL_DTYPES):
        return 0
    if not triton_available():
        if force or device.type == "cuda":
            log.info("triton is not installed: Grounding DINO's deformable attention stays in PyTorch")
        return 0
    layouts = {(outer.n_heads, outer.d_model // outer.n_heads, outer.n_levels, outer.n_points)
               for outer, _ in layers if hasattr(outer, "n_heads")}
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}.get(dtype, 1e-4)
    for heads, head_dim, levels, points in sorted(layouts):
        try:
            error = self_check(device, dtype if dtype in KERNEL_DTYPES else torch.float32, heads,
                               head_dim, levels, points)
        except Exception as failure:  # a Triton/driver problem on this GPU: keep the PyTorch path
            log.warning("fused deformable attention failed its check on %s (%s: %s): it stays in PyTorch",
                        device, type(failure).__name__, failure)
            return 0
        if not error <= tolerance:
            log.warning("fused deformable attention differs from PyTorch by %.3g on %s (%s): it stays "
                        "in PyTorch", error, device, dtype)
            return 0
    for _, inner in layers:
        if not getattr(inner, _FUSED_ATTR, False):
            inner.forward = _fused_forward(inner.forward)
            setattr(inner, _FUSED_ATTR, True)
    log.info("fused deformable attention (Triton) installed on %d layers (%s, %s)", len(layers), device, dtype)
    return len(layers)
