"""Benchmark the bitmask PNG (``BitmaskLabels``) against the brush RLE JSON of the same mask.

    python bench/bitmask_bench.py [--repeat N] [--json OUT]

Four masks, as the engine hands them over (a :class:`CompactMask`, the crop of the foreground's
bounding box):

- "compact, small object": one ellipse on 54 of 1080 rows (rle_bench's band case, 1.2%);
- "compact, large object": rle_bench's four ellipses, one with a hole (27.8% of 1920x1080);
- "fragmented": blobs of thresholded smooth noise with pixel speckle (foliage-like), 1920x1080;
- "12 MP": the four ellipses at 4000x3000.

Encoders, timed interleaved in one run (one call of each per round, random order; see
``rle_bench.sample_interleaved``), each including what makes its region's JSON string:

- RLE: the pipeline's ``compact_mask_rle`` (only the crop's rows) and ``json.dumps`` of the list;
- ours: ``compact_mask_png`` (ISA-L deflate of the crop's rows; the transparent rows from a cache)
  and the base64 data URL; the same with the standard library's zlib (the fallback) and, when
  installed, zlib-ng (python-zlib-ng);
- whole-image encoders, given the full mask they need (building it is counted): Pillow ("LA" and
  "RGBA", ``compress_level=1`` with the Z_RLE strategy, the fastest and smallest of its settings
  here), OpenCV (``cv2.imencode`` RGBA, level 1, RLE strategy; it has no grey + alpha), and
  imagecodecs' libpng (LA, level 1, Sub filter, RLE strategy: its "fast" settings) when installed.

Every PNG is checked before timing: it decodes (Pillow) to the image's size with LS's pixels,
RGBA (0, 0, 0, 255) on the mask and (0, 0, 0, 0) elsewhere, and its alpha equals the RLE's
decoded mask. Prints bytes per region (the JSON string LS stores) and times. CPU figures.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rle_bench import cpu_name, ellipse_mask, realistic_mask, sample_interleaved, summarise  # noqa: E402

from backend import bitmask  # noqa: E402
from backend.bitmask import png_data_url  # noqa: E402
from backend.ls.regions import compact_mask_png, compact_mask_rle  # noqa: E402
from backend.results import CompactMask  # noqa: E402
from backend.rle import rle_to_mask  # noqa: E402

BASE = "RLE: compact_mask_rle + JSON"


def fragmented_mask(height: int, width: int, seed: int = 7) -> np.ndarray:
    """Foliage-like: thresholded smooth noise (blobs with ragged edges and holes) on the lower 60% of
    the rows, with 3% of its pixels flipped (speckle)."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 24 + 2, width // 24 + 2)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    mask = field > 0.55
    mask[: int(height * 0.4)] = False
    mask ^= (rng.random((height, width)) < 0.03) & (np.arange(height)[:, None] >= int(height * 0.4))
    return mask


def _with_deflate(module, compact: CompactMask) -> bytes:
    """``compact_mask_png`` with another zlib-like deflate module (the transparent rows cached per module)."""
    saved = bitmask._deflate
    bitmask._deflate = module
    try:
        return compact_mask_png(compact)
    finally:
        bitmask._deflate = saved


def crop_encoders(compact: CompactMask) -> dict:
    """name -> () -> PNG bytes: ours, with ISA-L, the standard library's zlib and (when installed)
    zlib-ng, each compressing only the crop's rows."""
    encoders = {"ours (ISA-L), crop rows only": lambda: compact_mask_png(compact),
                "ours (stdlib zlib), crop rows only": lambda: _with_deflate(zlib, compact)}
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return encoders
    encoders["ours (zlib-ng), crop rows only"] = lambda: _with_deflate(zlib_ng, compact)
    return encoders


def whole_image_encoders(compact: CompactMask) -> dict:
    """name -> () -> PNG bytes, for the encoders that take the whole image."""
    import cv2
    from PIL import Image

    height, width = compact.height, compact.width
    top, left = compact.top, compact.left
    h, w = compact.crop.shape

    def full(channels: int) -> np.ndarray:
        pixels = np.zeros((height, width, channels), np.uint8)
        pixels[top:top + h, left:left + w, channels - 1] = compact.crop * np.uint8(255)
        return pixels

    def pillow(mode: str, channels: int):
        def encode() -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(full(channels), mode).save(buffer, "PNG", compress_level=1, compress_type=zlib.Z_RLE)
            return buffer.getvalue()
        return encode

    def opencv() -> bytes:
        ok, data = cv2.imencode(".png", full(4), [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                                  cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
        assert ok
        return data.tobytes()

    encoders = {"Pillow LA, whole image": pillow("LA", 2), "Pillow RGBA, whole image": pillow("RGBA", 4),
                "OpenCV RGBA, whole image": opencv}
    try:
        import imagecodecs
    except ImportError:
        return encoders
    encoders["imagecodecs libpng LA, whole image"] = lambda: imagecodecs.png_encode(
        full(2), level=1, strategy=3, filter=0x10)  # its documented fast settings: Sub filter, Z_RLE
    return encoders


def check_png(name: str, data: bytes, mask: np.ndarray) -> None:
    from PIL import Image

    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    assert rgba.shape[:2] == mask.shape, f"{name}: {rgba.shape} for a {mask.shape} mask"
    assert (rgba[mask] == (0, 0, 0, 255)).all() and (rgba[~mask] == 0).all(), f"{name}: not LS's pixels"


def run_case(name: str, mask: np.ndarray, repeat: int) -> dict:
    compact = CompactMask.from_full(mask)
    height, width = mask.shape
    rle = compact_mask_rle(compact)
    assert np.array_equal(rle_to_mask(rle, height, width), mask)
    pngs = {**crop_encoders(compact), **whole_image_encoders(compact)}
    sizes = {BASE: len(json.dumps(rle))}
    for label, encode in pngs.items():
        data = encode()
        check_png(label, data, mask)
        sizes[label] = len(json.dumps(png_data_url(data)))
    timed = {BASE: lambda: json.dumps(compact_mask_rle(compact))}
    timed.update({label: (lambda encode=encode: json.dumps(png_data_url(encode()))) for label, encode in pngs.items()})
    times = sample_interleaved(timed, repeat)
    rows = summarise(times, BASE)
    for row in rows:
        row["json_bytes"] = sizes[row["variant"]]
    return {"case": name, "size": f"{width}x{height}", "foreground": round(float(mask.mean()), 4),
            "crop": f"{compact.crop.shape[1]}x{compact.crop.shape[0]}", "repeat": repeat, "same_pixels": True,
            "rows": rows}


def print_case(case: dict) -> None:
    print(f"\n{case['case']}: {case['size']}, foreground {case['foreground']:.1%}, crop {case['crop']}, "
          f"{case['repeat']} rounds; every PNG decodes to the RLE's mask (LS's pixels): {case['same_pixels']}\n")
    key = next(k for k in case["rows"][0] if k.startswith("ratio_vs_"))
    print("| encoder | bytes in LS's JSON | best ms | median ms | time vs RLE (median) |")
    print("|---|---|---|---|---|")
    for row in case["rows"]:
        print(f"| {row['variant']} | {row['json_bytes']:,} | {row['best_ms']:.3f} | {row['median_ms']:.3f} | "
              f"{1 / row[key]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="rounds per 1080p case (the 12 MP case: a third)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    import cv2
    import PIL

    cases = [
        run_case("compact, small object", ellipse_mask(1080, 1920, 700.5, 1100, 27, 300), args.repeat),
        run_case("compact, large object", realistic_mask(1080, 1920), args.repeat),
        run_case("fragmented", fragmented_mask(1080, 1920), args.repeat),
        run_case("12 MP", realistic_mask(3000, 4000), max(3, args.repeat // 3)),
    ]
    print(f"CPU: {cpu_name()}, Python {platform.python_version()}, numpy {np.__version__}, Pillow "
          f"{PIL.__version__}, OpenCV {cv2.__version__}, deflate: {bitmask.DEFLATE_LIBRARY}")
    for case in cases:
        print_case(case)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
