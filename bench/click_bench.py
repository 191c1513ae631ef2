"""Smart-tool click latency: first click on an image (SAM image encoder + decoder) vs a second
click on the same image (cached embedding: decoder only), in one run.

Builds SAM at real ViT-B size with random weights (speed does not depend on weight values), saves it
and loads it through the normal code (SamSegmenter + EmbeddingCache), then times `refine` on a
1920x1080 image: first clicks on new images, then more clicks on a cached one. With --pipeline it also
times the whole server-side path (`Pipeline.predict` from a JPEG data URI to LS JSON with RLE): second
clicks interleaved with the segmenter's (their ratio), and a first click on a pre-warmed image vs a cold one.

    python bench/click_bench.py [--size vit-b|vit-h] [--device cpu|cuda] [--repeat 3] [--pipeline] [--json OUT]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.engine.device import configure_device  # noqa: E402
from backend.engine.embedcache import EmbeddingCache  # noqa: E402
from backend.engine.segmenter import SamSegmenter  # noqa: E402
from backend.results import MaskPrompt  # noqa: E402
from backend.engine.tiny import SAM_VISION_SIZES, build_real_size_sam  # noqa: E402

def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (27, 48, 3), dtype=np.uint8)  # smooth-ish content, like a photo
    return Image.fromarray(small).resize((1920, 1080), Image.BILINEAR)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SAM_VISION_SIZES), default="vit-b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3, help="first clicks (each on a new image)")
    parser.add_argument("--second-clicks", type=int, default=20)
    parser.add_argument("--pipeline", action="store_true", help="also time the full server-side path")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configure_device(device)  # as the engine does: before any torch work (FLUSH_DENORMALS' default)

    with tempfile.TemporaryDirectory() as tmp:
        source = build_real_size_sam(Path(tmp) / "sam", size=args.size)
        segmenter = SamSegmenter(str(source), device, dtype, batch_size=1, cache=EmbeddingCache(2**31))
        click = [MaskPrompt(None, np.array([[960.0, 540.0]]), np.array([1]))]
        images = [photo(seed) for seed in range(args.repeat + 1)]
        segmenter.refine(images[-1], "warm-up", click)  # first call pays one-off allocations
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        first = [timed(lambda i=i: (segmenter.refine(images[i], f"img{i}", click), sync()))
                 for i in range(args.repeat)]
        second = []
        for n in range(args.second_clicks):
            moved = [MaskPrompt(None, np.array([[900.0 + 7 * n, 500.0 + 3 * n]]), np.array([1]))]
            second.append(timed(lambda: (segmenter.refine(images[0], "img0", moved), sync())))
        figures = {
            "model": f"SAM {args.size} (random weights)", "device": str(device), "dtype": str(dtype),
            "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "image": "1920x1080", "first_click_ms_median": round(statistics.median(first), 1),
            "second_click_ms_median": round(statistics.median(second), 1),
            "second_click_ms_p90": round(float(np.percentile(second, 90)), 1),
            "ratio_first_vs_second": round(statistics.median(first) / statistics.median(second), 1),
        }
        if args.pipeline:
            figures.update(pipeline_figures(segmenter, args))
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def pipeline_figures(segmenter: SamSegmenter, args) -> dict:
    """The whole server-side path of a click, JPEG data URI in, LS JSON (with RLE) out, on the
    already loaded ``segmenter`` (its cache keys are content hashes here, so no clash with main's)."""
    from backend.engine.engine import Engine
    from backend.ls.labelconfig import parse_label_config
    from backend.pipeline.predict import Pipeline
    from backend.settings import Settings
    from backend.ls.tasks import PredictRequest

    pipeline = Pipeline(Settings(), engine_factory=lambda: Engine(detector=None, segmenter=segmenter))
    config = parse_label_config('<View><Image name="image" value="$image"/><KeyPointLabels name="k" toName="image" '
                                'smart="true"><Label value="obj"/></KeyPointLabels><BrushLabels name="m" '
                                'toName="image"><Label value="obj"/></BrushLabels></View>')

    def data_uri(seed: int) -> str:
        buffer = io.BytesIO()
        photo(seed).save(buffer, "JPEG", quality=90)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()

    def request(url: str, x: float) -> PredictRequest:
        item = {"type": "keypointlabels", "to_name": "image", "is_positive": True,
                "value": {"x": x, "y": 50.0, "keypointlabels": ["obj"]}}
        return PredictRequest([{"id": 1, "data": {"image": url}}], config, {"result": [item]})

    # Requests are built before timing: only pipeline.predict is measured.
    pipeline.predict(request(data_uri(99), 50.0))
    firsts = [request(data_uri(100 + s), 50.0) for s in range(args.repeat)]
    repeated = data_uri(100)
    seconds = [request(repeated, 40.0 + n) for n in range(args.second_clicks)]
    first = [timed(lambda r=r: pipeline.predict(r)) for r in firsts]
    second = [timed(lambda r=r: pipeline.predict(r)) for r in seconds]
    # The same second clicks on the segmenter alone and through the whole path, interleaved one by
    # one on the same cached embedding (its key is the bytes' hash, as the pipeline computes it), so
    # a shared machine's load hits both alike: the ratio is what the path adds to the decoder.
    key = hashlib.sha256(base64.b64decode(repeated.split(",", 1)[1])).hexdigest()
    image = photo(100)
    sync = torch.cuda.synchronize if segmenter.device.type == "cuda" else (lambda: None)
    alone, whole = [], []
    for n in range(args.second_clicks):
        click = [MaskPrompt(None, np.array([[(40.0 + n) * 19.2, 540.0]]), np.array([1]))]
        alone.append(timed(lambda: (segmenter.refine(image, key, click), sync())))
        whole.append(timed(lambda r=seconds[n]: pipeline.predict(r)))
    # Pre-warmed first click: a new image encoded ahead, as the pre-warmer does (load the task's bytes,
    # engine.warm), then the annotator's first click on it, timed like the cold first clicks above.
    warmed = data_uri(200)
    loaded = pipeline.loader.load(warmed, defer=True)
    pipeline.engine().warm(loaded.pixels, loaded.sha256)
    prewarmed = timed(lambda: pipeline.predict(request(warmed, 50.0)))
    return {"pipeline_first_click_ms_median": round(statistics.median(first), 1),
            "pipeline_prewarmed_first_click_ms": round(prewarmed, 1),
            "pipeline_cold_over_prewarmed_first_click": round(statistics.median(first) / prewarmed, 1),
            "pipeline_second_click_ms_median": round(statistics.median(second), 1),
            "pipeline_ratio": round(statistics.median(first) / statistics.median(second), 1),
            "interleaved_segmenter_second_click_ms_median": round(statistics.median(alone), 1),
            "interleaved_pipeline_second_click_ms_median": round(statistics.median(whole), 1),
            "pipeline_over_segmenter_second_click": round(statistics.median(whole) / statistics.median(alone), 2)}


if __name__ == "__main__":
    main()
