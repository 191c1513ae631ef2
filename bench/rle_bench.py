"""Benchmark backend.rle against label_studio_sdk's brush RLE.

    python bench/rle_bench.py [--repeat N] [--sdk-repeat M] [--large] [--json OUT]

Builds a realistic brush mask (a few filled, partly overlapping ellipses, one with a
hole) at 1920x1080 (and 4000x3000 with --large), checks that ``mask_to_rle`` is
byte-identical to ``brush.mask2rle(mask.astype(np.uint8) * 255)`` and that both
decoders agree, then times encode and decode with ``time.perf_counter``, one call per
sample, and prints best and median per implementation. The SDK is timed on its
ready-made uint8 input, so its mask conversion is not counted against it.

Then, in the same run, ours against ours (each output checked against the SDK first):
a 1920x1080 mask whose object covers ~5% of the rows, encoded whole with
``mask_to_rle`` vs as its row band with ``band_to_rle``. The two are timed interleaved
(one call of each per round, in random order) so that load from other jobs hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from label_studio_sdk.converter import brush  # noqa: E402

from backend.rle import band_to_rle, mask_to_rle, rle_to_mask  # noqa: E402


def realistic_mask(height: int, width: int) -> np.ndarray:
    """(height, width) bool: four ellipses scaled to the frame, one with a hole."""
    yy, xx = np.ogrid[:height, :width]

    def ellipse(cy, cx, ry, rx, angle=0.0):
        c, s = np.cos(angle), np.sin(angle)
        dy, dx = (yy - cy * height), (xx - cx * width)
        u, v = dx * c + dy * s, -dx * s + dy * c
        return (u / (rx * width)) ** 2 + (v / (ry * height)) ** 2 <= 1

    mask = ellipse(0.30, 0.25, 0.18, 0.15, 0.3) | ellipse(0.62, 0.62, 0.25, 0.20, -0.5)
    mask |= ellipse(0.50, 0.50, 0.09, 0.05)
    mask |= ellipse(0.82, 0.15, 0.12, 0.10) & ~ellipse(0.82, 0.15, 0.05, 0.04)
    return mask


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sample(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_case(height: int, width: int, repeat: int, sdk_repeat: int) -> list[dict]:
    mask = realistic_mask(height, width)
    mask_u8 = mask.astype(np.uint8) * 255

    sdk_rle = brush.mask2rle(mask_u8)
    ours_rle = mask_to_rle(mask)
    identical = ours_rle == sdk_rle
    sdk_alpha = brush.decode_rle(sdk_rle).reshape(height, width, 4)[:, :, 3] != 0
    decoded = rle_to_mask(sdk_rle, height, width)
    decode_ok = bool(np.array_equal(decoded, mask) and np.array_equal(sdk_alpha, mask))

    common = {
        "size": f"{width}x{height}",
        "foreground": round(float(mask.mean()), 4),
        "runs": int(np.count_nonzero(mask.ravel()[1:] != mask.ravel()[:-1]) + 1),
        "rle_bytes": len(sdk_rle),
    }
    cases = [
        (
            "encode",
            lambda: brush.mask2rle(mask_u8),
            lambda: mask_to_rle(mask),
            identical,
        ),
        (
            "decode",
            lambda: brush.decode_rle(sdk_rle).reshape(height, width, 4)[:, :, 3],
            lambda: rle_to_mask(sdk_rle, height, width),
            decode_ok,
        ),
    ]
    rows = []
    for op, sdk_fn, ours_fn, same in cases:
        sdk_t, ours_t = sample(sdk_fn, sdk_repeat), sample(ours_fn, repeat)
        row = dict(common, op=op, identical=bool(same), sdk_repeat=sdk_repeat, repeat=repeat)
        for who, times in (("sdk", sdk_t), ("ours", ours_t)):
            row[f"{who}_best_ms"] = min(times) * 1e3
            row[f"{who}_median_ms"] = statistics.median(times) * 1e3
        row["speedup_median"] = row["sdk_median_ms"] / row["ours_median_ms"]
        row["speedup_best"] = row["sdk_best_ms"] / row["ours_best_ms"]
        rows.append(row)
    return rows


def ellipse_mask(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.ogrid[:height, :width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def row_band(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(band, top, height) of the rows of ``mask`` that hold foreground."""
    rows = np.flatnonzero(mask.any(axis=1))
    top, stop = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
    return np.ascontiguousarray(mask[top:stop]), top, mask.shape[0]


def sample_interleaved(fns: dict, repeat: int) -> dict[str, list[float]]:
    """Times each function ``repeat`` times, one call of each per round.

    Each round runs the variants in a fresh random order (fixed seed): the call
    after a heavy variant pays for re-warming caches and the allocator, which with
    a fixed or rotating order showed up as a 10-15% gap between two calls of the
    very same code.
    """
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    times = {name: [] for name in names}
    order = np.random.default_rng(12345)
    for _ in range(repeat):
        for i in order.permutation(len(names)):
            start = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], base: str) -> list[dict]:
    ref = statistics.median(times[base])
    return [
        {
            "variant": name,
            "best_ms": min(t) * 1e3,
            "median_ms": statistics.median(t) * 1e3,
            "ratio_vs_" + base: ref / statistics.median(t),
        }
        for name, t in times.items()
    ]


def run_band_case(repeat: int) -> dict:
    """Whole-mask mask_to_rle vs band_to_rle on a 1080p mask, object on ~5% of rows."""
    height, width = 1080, 1920
    mask = ellipse_mask(height, width, 700.5, 1100, 27, 300)  # 54 of 1080 rows
    band, top, _ = row_band(mask)
    sdk = brush.mask2rle(mask.astype(np.uint8) * 255)
    identical = mask_to_rle(mask) == sdk and band_to_rle(band, top, height) == sdk
    times = sample_interleaved(
        {
            "mask_to_rle(whole mask)": lambda: mask_to_rle(mask),
            "band_to_rle(row band)": lambda: band_to_rle(band, top, height),
        },
        repeat,
    )
    return {
        "size": f"{width}x{height}",
        "band_rows": band.shape[0],
        "foreground": round(float(mask.mean()), 4),
        "identical": bool(identical),
        "repeat": repeat,
        "rows": summarise(times, "mask_to_rle(whole mask)"),
    }


def print_ratio_table(title: str, rows: list[dict]) -> None:
    key = next(k for k in rows[0] if k.startswith("ratio_vs_"))
    print(f"| {title} | best ms | median ms | ratio (median) vs {key[len('ratio_vs_'):]} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['best_ms']:.3f} | {r['median_ms']:.3f} | {r[key]:.2f}x |")


def print_table(rows: list[dict]) -> None:
    header = (
        "| size | op | SDK best ms | SDK median ms | ours best ms | ours median ms "
        "| speed-up (median) | speed-up (best) | bit-identical |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['op']} | {r['sdk_best_ms']:.2f} | {r['sdk_median_ms']:.2f} "
            f"| {r['ours_best_ms']:.3f} | {r['ours_median_ms']:.3f} "
            f"| {r['speedup_median']:.1f}x | {r['speedup_best']:.1f}x | {r['identical']} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=50, help="timed calls of mask_to_rle/rle_to_mask")
    parser.add_argument("--sdk-repeat", type=int, default=10, help="timed calls of the SDK functions")
    parser.add_argument("--large", action="store_true", help="also run 4000x3000")
    parser.add_argument("--json", type=Path, help="write the rows and machine info here")
    args = parser.parse_args()
    if args.repeat < 1 or args.sdk_repeat < 1:
        parser.error("--repeat and --sdk-repeat must be >= 1")

    sizes = [(1080, 1920)] + ([(3000, 4000)] if args.large else [])
    rows = [row for h, w in sizes for row in run_case(h, w, args.repeat, args.sdk_repeat)]
    info = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(f"# {info['cpu']}, {info['cpus']} CPUs, Python {info['python']}, numpy {info['numpy']}")
    for r in rows[::2]:
        print(f"# {r['size']}: foreground {r['foreground']:.1%}, {r['runs']} runs, {r['rle_bytes']} RLE bytes")
    print_table(rows)

    band = run_band_case(args.repeat)
    print(
        f"\n# band: {band['size']}, object on {band['band_rows']} rows, foreground "
        f"{band['foreground']:.2%}, {band['repeat']} rounds, "
        f"bit-identical to SDK: {band['identical']}"
    )
    print_ratio_table("band vs whole mask", band["rows"])

    if args.json:
        payload = {"machine": info, "rows": rows, "band": band}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r["identical"] for r in rows) and band["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
