"""The Triton kernel of :mod:`backend.engine.msda` (imports Triton: import it only through
``msda._kernel()``, so that CPU deployments never need Triton).

One program computes ``BLOCK_Q`` queries of one (batch, head), all ``head_dim`` channels: for each
level and point it loads the (x, y) location and attention weight of its queries, computes
grid_sample's four bilinear corner weights in fp32, gathers the four corners' channel rows from
``value`` (contiguous ``head_dim`` elements each, in the input dtype) and accumulates in fp32.
The output is written once, in the output's dtype.
"""

import triton
import triton.language as tl


@triton.jit
def _corner(level_base, xs, ys, ok, width, row_stride, channels, channel_ok):
    """value rows at pixel (xs, ys) of one level, all channels, as fp32; zero where not ``ok``."""
    position = tl.where(ok, ys * width + xs, 0)
    pointers = level_base + (position * row_stride)[:, None] + channels[None, :]
    return tl.load(pointers, mask=ok[:, None] & channel_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    num_queries, seq_len,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_Q queries of one (batch, head), all head_dim channels.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // NUM_HEADS
    head = pid_bh % NUM_HEADS
    queries = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    query_ok = queries < num_queries
    channel_ok = channels < HEAD_DIM
    row_stride = NUM_HEADS * HEAD_DIM  # one position of value, all heads
    # value[batch, s, head, :] lies at value_base + s * row_stride (int64: batch x seq may be large)
    value_base = value_ptr + batch.to(tl.int64) * seq_len * row_stride + head * HEAD_DIM
    # (batch, query, head) rows of sampling_locations / attention_weights / output
    rows = (batch.to(tl.int64) * num_queries + queries) * NUM_HEADS + head
    loc_rows = loc_ptr + rows * (NUM_LEVELS * NUM_POINTS * 2)
    attn_rows = attn_ptr + rows * (NUM_LEVELS * NUM_POINTS)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        level_base = value_base + start.to(tl.int64) * row_stride
        for point in tl.static_range(NUM_POINTS):
            sample = level * NUM_POINTS + point
            loc_x = tl.load(loc_rows + 2 * sample, mask=query_ok, other=0.0).to(tl.float32)
            loc_y = tl.load(loc_rows + 2 * sample + 1, mask=query_ok, other=0.0).to(tl.float32)
            weight = tl.load(attn_rows + sample, mask=query_ok, other=0.0).to(tl.float32)
            # As transformers + grid_sample(align_corners=False) round it: grid = 2 * loc - 1,
            # pixel = (grid + 1) / 2 * size - 0.5. Clamped to [-2, size + 1] so that far-away
            # locations (all four corners outside, i.e. zero either way) never overflow the ints.
            x = ((loc_x * 2.0 - 1.0) + 1.0) * 0.5 * width_f - 0.5
            y = ((loc_y * 2.0 - 1.0) + 1.0) * 0.5 * height_f - 0.5
            x = tl.minimum(tl.maximum(x, -2.0), width_f + 1.0)
            y = tl.minimum(tl.maximum(y, -2.0), height_f + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            x1f = x0f + 1.0
            y1f = y0f + 1.0
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            x1 = x0 + 1
            y1 = y0 + 1
            x0_ok = (x0 >= 0) & (x0 < width)
            x1_ok = (x1 >= 0) & (x1 < width)
            y0_ok = (y0 >= 0) & (y0 < height) & query_ok
            y1_ok = (y1 >= 0) & (y1 < height) & query_ok
            # grid_sample's corner weights (nw, ne, sw, se), times the attention weight
            w_nw = (x1f - x) * (y1f - y) * weight
            w_ne = (x - x0f) * (y1f - y) * weight
            w_sw = (x1f - x) * (y - y0f) * weight
            w_se = (x - x0f) * (y - y0f) * weight
            acc += _corner(level_base, x0, y0, x0_ok & y0_ok, width, row_stride, channels, channel_ok) \
                * w_nw[:, None]
            acc += _corner(level_base, x1, y0, x1_ok & y0_ok, width, row_stride, channels, channel_ok) \
                * w_ne[:, None]
            acc += _corner(level_base, x0, y1, x0_ok & y1_ok, width, row_stride, channels, channel_ok) \
                * w_sw[:, None]
            acc += _corner(level_base, x1, y1, x1_ok & y1_ok, width, row_stride, channels, channel_ok) \
                * w_se[:, None]
    out_pointers = out_ptr + (rows * HEAD_DIM)[:, None] + channels[None, :]
    tl.store(out_pointers, acc.to(out_ptr.dtype.element_ty),
             mask=query_ok[:, None] & channel_ok[None, :])
