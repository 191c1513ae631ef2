"""SAM's ViT attention with decomposed relative positions, without a dense bias (``SAM_ATTENTION=flex``).

transformers' SDPA path (``SamVisionSdpaAttention``) adds SAM's relative positions as a dense
``attn_mask`` of (B, heads, HW, HW): for ViT-H's global layers (64x64 tokens) 512 MiB per image
and layer in bf16, written and read back, and a float mask rules out FlashAttention. The bias is a
sum of two small factors, ``rel_h`` (B, heads, HW, H) and ``rel_w`` (B, heads, HW, W)
(``get_decomposed_rel_pos``), so FlexAttention can add them inside its kernel instead:
``score + rel_h[b, h, q, k // W] + rel_w[b, h, q, k % W]`` for key k = (k // W, k % W).

``install_relpos_attention(model, "flex")`` replaces the forward of every rel-pos attention of a
SAM / SAM-HQ vision encoder with :func:`flex_forward`; ``"sdpa"`` leaves transformers' path. Both
give the layers :func:`rel_pos_on_device`, which builds the position indices where the table is. On
CUDA FlexAttention runs compiled (a Triton kernel, compiled at the first batch of each shape);
elsewhere it runs eagerly (correct, not fast: for tests and the CPU). ``bench/attention.py``
measures both paths on ViT-H's real shapes; ``tests/test_relpos.py`` checks they agree.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from backend.settings import SAM_ATTENTIONS

log = logging.getLogger(__name__)

RELPOS_ATTENTIONS = SAM_ATTENTIONS  # "sdpa": transformers' path; "flex": flex_forward


def rel_pos_on_device(attn, q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """``SamVisionAttention.get_rel_pos`` with its coordinates built on ``rel_pos``'s device.

    transformers builds them on the CPU and indexes the device tensor with them: a blocking
    host→device copy, one host wait per layer and forward (32 for ViT-H). Same arithmetic, so the
    same (q_size, k_size, C) result."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).transpose(1, 2), size=max_rel_dist,
                            mode="linear")
    resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative_coords.long()]


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (it has no fast eager path on CUDA)."""
    return torch.compile(flex_attention, dynamic=False)


def decomposed_factors(attn, query: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*heads, HW, C) queries → rel_h (B*heads, HW, H) and rel_w (B*heads, HW, W): the two terms
    whose outer sum is ``attn.get_decomposed_rel_pos`` (the layer's own ``get_rel_pos``)."""
    rel_pos_h = attn.get_rel_pos(height, height, attn.rel_pos_h)  # (H, H, C)
    rel_pos_w = attn.get_rel_pos(width, width, attn.rel_pos_w)  # (W, W, C)
    grid = query.reshape(query.shape[0], height, width, query.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid, rel_pos_h).reshape(query.shape[0], height * width, height)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid, rel_pos_w).reshape(query.shape[0], height * width, width)
    return rel_h, rel_w


def flex_forward(attn, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, None]:
    """``SamVisionSdpaAttention.forward`` with the relative positions added inside FlexAttention.

    ``hidden_states``: (B, H, W, D) tokens of one window or of the whole grid; returns (B, H, W, D)
    and None (no attention weights, as the SDPA path)."""
    batch, height, width, _ = hidden_states.shape
    heads = attn.num_attention_heads
    qkv = attn.qkv(hidden_states).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)  # (B, heads, HW, C)
    rel_h, rel_w = decomposed_factors(attn, query.reshape(batch * heads, height * width, -1), height, width)
    rel_h = rel_h.reshape(batch, heads, height * width, height)
    rel_w = rel_w.reshape(batch, heads, height * width, width)

    def add_relative_positions(score, b, h, q_index, k_index):
        return score + rel_h[b, h, q_index, k_index // width] + rel_w[b, h, q_index, k_index % width]

    # Inside a compiled block (COMPILE=1) the block's compile takes FlexAttention in; alone on CUDA
    # it needs its own compile; on the CPU it runs eagerly.
    run = _compiled_flex() if hidden_states.is_cuda and not torch.compiler.is_compiling() else flex_attention
    output = run(query, key, value, score_mod=add_relative_positions)  # (B, heads, HW, C)
    output = output.permute(0, 2, 1, 3).reshape(batch, height, width, -1)
    return attn.proj(output), None


def install_relpos_attention(model: torch.nn.Module, kind: str) -> int:
    """Route ``model``'s rel-pos vision attentions through ``kind`` ("sdpa": transformers' own
    forward; "flex": :func:`flex_forward`). Either way their ``get_rel_pos`` becomes
    :func:`rel_pos_on_device`. Returns the number of layers whose forward was switched (0 for sdpa)."""
    if kind not in RELPOS_ATTENTIONS:
        raise ValueError(f"SAM_ATTENTION={kind!r}: use one of {', '.join(RELPOS_ATTENTIONS)}")
    layers = [module for module in model.modules()
              if getattr(module, "use_rel_pos", False) and hasattr(module, "get_rel_pos") and hasattr(module, "qkv")]
    for module in layers:
        module.get_rel_pos = types.MethodType(rel_pos_on_device, module)
    if kind == "sdpa":
        return 0
    for module in layers:
        module.forward = types.MethodType(flex_forward, module)
    switched = len(layers)
    log.info("SAM_ATTENTION=flex: %d attention layers add their relative positions inside FlexAttention", switched)
    return switched
