"""SAM ViT-H's relative-position attention: which path is fastest (and still correct)?

One attention layer of ViT-H (hidden 1280, 16 heads of 80) with random weights, in its two shapes:
a global layer (64x64 tokens; 4 of the 32 layers) and a windowed one (25 windows of 14x14 tokens
per image; the other 28). Each path runs the same layer:

- ``sdpa``: transformers' path as the engine runs it (dense (B, heads, HW, HW) bias, torch picks
  the SDPA backend), then the same forced to each backend that takes a float mask: ``cudnn``,
  ``efficient`` (CUTLASS memory-efficient), ``math``;
- ``flex``: ``SAM_ATTENTION=flex`` (``backend/engine/relpos.py``), FlexAttention adding the two
  decomposed factors inside its kernel, compiled.

Reported per path: ms per image for each layer shape, the encoder's attention per image
(4 global + 28 windowed), peak memory, and the largest difference from ``sdpa`` (relative to its
largest output). Exits non-zero when a path disagrees beyond the dtype's tolerance.

    python bench/attention.py --device cuda --batch 8 --json OUT     # timings (bf16)
    python bench/attention.py --device cpu                           # agreement only, small grid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.engine.relpos import flex_forward  # noqa: E402

GLOBAL_LAYERS, WINDOW_LAYERS = 4, 28
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def layer(grid: int, window: int, dtype: torch.dtype, device: torch.device) -> SamVisionSdpaAttention:
    """ViT-H's attention at ``grid`` tokens a side (``window`` 0: global), random weights."""
    config = SamVisionConfig(hidden_size=1280, num_attention_heads=16, image_size=grid * 16, patch_size=16,
                             use_rel_pos=True)
    attention = SamVisionSdpaAttention(config, window)
    generator = torch.Generator().manual_seed(window)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return attention.to(device, dtype).eval()


def paths(device: torch.device) -> dict:
    """name → (forward(attention, hidden), context)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = lambda attention, hidden: attention(hidden)[0]  # noqa: E731
    found = {"sdpa": (sdpa, nullcontext)}
    if device.type == "cuda":
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("math", SDPBackend.MATH)):
            found[f"sdpa-{name}"] = (sdpa, lambda backend=backend: sdpa_kernel([backend]))
    found["flex"] = (lambda attention, hidden: flex_forward(attention, hidden)[0], nullcontext)
    return found


def time_path(forward, context, attention, hidden, device: torch.device, repeats: int) -> tuple[float, int]:
    """(ms per call, peak bytes above the start) of ``forward`` after two warm-up calls."""
    with torch.inference_mode(), context():
        for _ in range(2):
            forward(attention, hidden)
        if device.type != "cuda":
            return float("nan"), 0
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(repeats):
            forward(attention, hidden)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000 / repeats, torch.cuda.max_memory_allocated() - base


def measure(device: torch.device, dtype: torch.dtype, batch: int, grid: int, window: int, repeats: int) -> dict:
    windows_per_image = (-(-grid // window)) ** 2  # the grid padded to whole windows
    shapes = {"global": (layer(grid, 0, dtype, device), batch, grid),
              "window": (layer(window, window, dtype, device), batch * windows_per_image, window)}
    generator = torch.Generator().manual_seed(0)
    results, worst = {}, 0.0
    for shape, (attention, rows, side) in shapes.items():
        hidden = (torch.randn(rows, side, side, 1280, generator=generator)).to(device, dtype)
        with torch.inference_mode():
            reference = attention(hidden)[0].float()
        for name, (forward, context) in paths(device).items():
            try:
                ms, peak = time_path(forward, context, attention, hidden, device, repeats)
                with torch.inference_mode(), context():
                    output = forward(attention, hidden).float()
                error = float((output - reference).abs().max() / reference.abs().max())
            except RuntimeError as exc:  # a backend that refuses the shape/dtype: say so, go on
                results.setdefault(name, {})[shape] = {"error": str(exc).splitlines()[0][:200]}
                continue
            worst = max(worst, error)
            results.setdefault(name, {})[shape] = {"ms_per_image": ms / batch, "peak_mib": peak / 2**20,
                                                   "relative_error": error}
    for figures in results.values():
        if all("ms_per_image" in figures.get(s, {}) for s in shapes):
            figures["encoder_attention_ms_per_image"] = (GLOBAL_LAYERS * figures["global"]["ms_per_image"]
                                                         + WINDOW_LAYERS * figures["window"]["ms_per_image"])
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "batch": batch, "grid": grid, "window": window, "paths": results, "worst_relative_error": worst,
            "tolerance": TOLERANCE[dtype]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="images (default 8 cuda, 1 cpu)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default bf16 cuda, fp32 cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if cuda else "fp32")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager FlexAttention on the CPU says it is slow
        figures = measure(device, dtype, args.batch or (8 if cuda else 1), 64 if cuda else 8, 14 if cuda else 4,
                          args.repeats)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    for name, values in figures["paths"].items():
        if cuda and "encoder_attention_ms_per_image" in values:
            print(f"{name}: {values['encoder_attention_ms_per_image']:.2f} ms/image of encoder attention "
                  f"(global {values['global']['ms_per_image']:.2f}, window {values['window']['ms_per_image']:.3f}), "
                  f"peak {values['global']['peak_mib']:.0f} MiB")
    agree = figures["worst_relative_error"] <= figures["tolerance"]
    print(f"agreement: worst relative error {figures['worst_relative_error']:.2e} "
          f"({'within' if agree else 'OUTSIDE'} {figures['tolerance']:.0e})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
