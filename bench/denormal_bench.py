"""SAM's image encoder on the CPU with subnormal floats kept vs flushed to zero (FLUSH_DENORMALS).

Builds SAM at real ViT-B size (random weights) once, then runs two child processes, one per setting,
each calling the engine's :func:`backend.engine.device.configure_device` first thing (the flag must
be set before torch's thread pool starts) and timing ``SamSegmenter.embed`` on a 1920x1080 photo
(padded below to SAM's square) and a 1080x1080 one (no padding). Prints both and their ratio, and
how far the embeddings differ.

    python bench/denormal_bench.py [--size vit-b|vit-h] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.click_bench import photo  # noqa: E402
from backend.engine.device import configure_device  # noqa: E402
from backend.engine.tiny import SAM_VISION_SIZES, build_real_size_sam  # noqa: E402

SHAPES = {"landscape 1920x1080": (1920, 1080), "square 1080x1080": (1080, 1080)}


def child(source: str, flush: bool, out: str) -> None:
    configure_device(torch.device("cpu"), flush_denormals=flush)  # before any torch work
    from backend.engine.embedcache import EmbeddingCache
    from backend.engine.segmenter import SamSegmenter

    segmenter = SamSegmenter(source, torch.device("cpu"), torch.float32, batch_size=1, cache=EmbeddingCache(0))
    times, embeddings = {}, {}
    for name, size in SHAPES.items():
        image = photo(1).resize(size)
        started = time.perf_counter()
        embedding = segmenter.embed([image])[0]
        times[name] = round(time.perf_counter() - started, 2)
        embeddings[name] = embedding.embeddings.float().numpy()
    np.savez(out + ".npz", **embeddings)
    Path(out).write_text(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SAM_VISION_SIZES), default="vit-b")
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "FLUSH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.child[2])
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = build_real_size_sam(Path(tmp) / "sam", size=args.size)
        runs = {}
        for flush in (False, True):
            out = str(Path(tmp) / f"flush{int(flush)}.json")
            subprocess.run([sys.executable, __file__, "--child", str(source), str(int(flush)), out], check=True)
            runs[flush] = (json.loads(Path(out).read_text()), np.load(out + ".npz"))
        figures = {"model": f"SAM {args.size} encoder (random weights)", "device": "cpu",
                   "threads": torch.get_num_threads()}
        for name in SHAPES:
            kept, flushed = runs[False][0][name], runs[True][0][name]
            difference = float(np.abs(runs[False][1][name] - runs[True][1][name]).max())
            figures[name] = {"kept_s": kept, "flushed_s": flushed, "kept_over_flushed": round(kept / flushed, 1),
                             "max_abs_difference": difference}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
