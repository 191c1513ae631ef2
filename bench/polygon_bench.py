"""Benchmark polygon extraction (``backend.ls.polygons.mask_polygons``) next to brush RLE.

    python bench/polygon_bench.py [--repeat N] [--json OUT]

Two 1080p masks, both as the engine hands them over (a :class:`CompactMask`, the crop of the
foreground's bounding box):

- "shapes": rle_bench's realistic mask (four ellipses, one with a hole; ~20% of the image);
- "small object": one ellipse on ~5% of the rows (a typical detection).

For each, timed interleaved in one run (one call of each per round, random order; see
``rle_bench.sample_interleaved``): ``mask_to_rle`` of the full mask, the pipeline's RLE of the
compact mask (``compact_mask_rle``: only the rows with foreground), and polygons at tolerance 1.5
(the default) and 0 (every contour vertex), and at 1.5 with a minimum component area (counted
from the outline, no labelling pass), each with the LS JSON points (percent lists). Prints
ratios against ``mask_to_rle``, vertex counts and the JSON size of each region kind. CPU ratios
only: the absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rle_bench import cpu_name, ellipse_mask, print_ratio_table, realistic_mask, sample_interleaved, summarise  # noqa: E402

from backend.ls.geometry import pixel_points_to_percent  # noqa: E402
from backend.ls.polygons import PolygonParams, mask_polygons  # noqa: E402
from backend.ls.regions import compact_mask_rle  # noqa: E402
from backend.results import CompactMask  # noqa: E402
from backend.rle import mask_to_rle  # noqa: E402

HEIGHT, WIDTH = 1080, 1920


def polygon_points(compact: CompactMask, params: PolygonParams) -> list[list[list[float]]]:
    """What a polygon region carries: the percent points of every component's polygon."""
    return [pixel_points_to_percent(p, WIDTH, HEIGHT).tolist() for p in mask_polygons(compact, params)]


def run_case(name: str, mask, repeat: int) -> dict:
    compact = CompactMask.from_full(mask)
    default, exact, filtered = PolygonParams(), PolygonParams(tolerance=0), PolygonParams(min_area=100)
    assert compact_mask_rle(compact) == mask_to_rle(mask)
    times = sample_interleaved({
        "mask_to_rle(full mask)": lambda: mask_to_rle(mask),
        "compact_mask_rle (pipeline RLE)": lambda: compact_mask_rle(compact),
        "polygons, tolerance 1.5": lambda: polygon_points(compact, default),
        "polygons, tolerance 0": lambda: polygon_points(compact, exact),
        "polygons, tolerance 1.5, min area 100 px": lambda: polygon_points(compact, filtered),
    }, repeat)
    polygons, exact_polygons = polygon_points(compact, default), polygon_points(compact, exact)
    return {
        "case": name, "size": f"{WIDTH}x{HEIGHT}", "foreground": round(float(mask.mean()), 4),
        "crop": f"{compact.crop.shape[1]}x{compact.crop.shape[0]}", "repeat": repeat,
        "polygons": len(polygons), "vertices_tol_1_5": sum(map(len, polygons)),
        "vertices_tol_0": sum(map(len, exact_polygons)),
        "json_bytes_rle": len(json.dumps(compact_mask_rle(compact))),
        "json_bytes_polygons_tol_1_5": len(json.dumps(polygons)),
        "rows": summarise(times, "mask_to_rle(full mask)"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    import cv2

    cases = [run_case("shapes", realistic_mask(HEIGHT, WIDTH), args.repeat),
             run_case("small object", ellipse_mask(HEIGHT, WIDTH, 700.5, 1100, 27, 300), args.repeat)]
    print(f"CPU: {cpu_name()}, Python {platform.python_version()}, OpenCV {cv2.__version__}, "
          f"{args.repeat} rounds")
    for case in cases:
        print(f"\n{case['case']}: {case['size']}, foreground {case['foreground']:.1%}, crop {case['crop']}, "
              f"{case['polygons']} polygons, {case['vertices_tol_1_5']} vertices at 1.5 px "
              f"({case['vertices_tol_0']} at 0), JSON {case['json_bytes_polygons_tol_1_5']} B of polygons vs "
              f"{case['json_bytes_rle']} B of RLE\n")
        print_ratio_table(case["case"], case["rows"])
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
