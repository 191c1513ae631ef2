"""Bulk pre-labeling throughput, end to end: encoded JPEG bytes → LS JSON (RLE included).

Builds Grounding DINO-T and SAM ViT-H with random weights from their configs (speed does not
depend on weight values; ``--models tiny`` for a smoke run), saves them and loads them through the
normal code. Then, in one run, on the same synthetic 1920x1080 JPEGs and a 3-phrase prompt with
at most 5 detections per image:

- the fast path: ``Pipeline.predict_outcomes`` (threads decode and prepare ahead of the engine,
  batched bf16 models on CUDA, masks upsampled on the device, RLE of the mask rows only, in a
  thread pool) — images/s, per-stage ms per image, peak GPU memory, optionally per batch size;
- the anchor path (``bench/anchor.py``): fp32, one image at a time, SAM encoder per call, masks
  upsampled on the CPU, the SDK's ``mask2rle`` — images/s on ``--anchor-images`` of the images;
- agreement of the two paths' detections (box IoU) and masks (mask IoU) on those images.

    python bench/pipeline.py --device cuda --images 256 --json OUT
    python bench/pipeline.py --device cpu --images 2 --anchor-images 2     # CPU: ratios only

On the CPU the absolute times mean little (no bf16, few cores); report the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.engine.engine import Engine  # noqa: E402
from backend.engine.device import measure_peak_bytes  # noqa: E402
from backend.images.decode import LoadedImage, decode_image  # noqa: E402
from backend.ls.labelconfig import parse_label_config  # noqa: E402
from backend.pipeline.predict import Pipeline  # noqa: E402
from backend.rle import rle_to_mask  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.ls.tasks import PredictRequest  # noqa: E402
from backend.engine.tiny import make_family_model, make_real_size_models, make_tiny_models  # noqa: E402
from backend.settings import EngineKind  # noqa: E402
from bench.anchor import AnchorPath  # noqa: E402

PHRASES = ["cat", "dog", "car"]
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="box" toName="image">' + "".join(f'<Label value="{p}"/>' for p in PHRASES) +
          '</RectangleLabels><BrushLabels name="mask" toName="image">' +
          "".join(f'<Label value="{p}"/>' for p in PHRASES) + '</BrushLabels>'
          '<TextArea name="prompt" toName="image"/></View>')
STAGES = ("images", "prepare", "engine", "regions")
#: ``--engine``: the family checkpoint it adds to the default pair, and the settings that select it.
ENGINES = {
    "grounded-sam": (None, {}),
    "sam-hq": ("sam-hq", {"sam_model": "sam-hq"}),
    "sam2": ("sam2", {"sam_model": "sam2"}),
    "mm-grounding-dino": ("mm-grounding-dino", {"grounding_dino_model": "mm-grounding-dino"}),
    "sam3": ("sam3", {"engine": EngineKind.SAM3, "sam3_model": "sam3"}),
}


def jpeg(seed: int, width: int = 1920, height: int = 1080) -> bytes:
    """A photo-like JPEG: a smooth colour field with a few solid shapes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (9, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, x1 = sorted(rng.integers(0, width, size=2))
        y0, y1 = sorted(rng.integers(0, height, size=2))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class MemoryLoader:
    """``ImageLoader.load`` over in-memory JPEGs: the product's decode, no network."""

    def __init__(self, blobs: dict[str, bytes], max_image_pixels: int):
        self.blobs, self.max_image_pixels = blobs, max_image_pixels

    def load(self, url: str, task_id: object = None, defer: bool = False) -> LoadedImage:
        # defer is a hint (decode later if these bytes were seen): decoding now always satisfies it
        return LoadedImage.from_bytes(self.blobs[url], url, self.max_image_pixels)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def request_for(urls: list[str], config) -> PredictRequest:
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(urls)]
    return PredictRequest(tasks=tasks, config=config, context=None)


def stage_seconds(pipeline: Pipeline) -> dict[str, float]:
    registry = pipeline.metrics.registry
    return {stage: registry.get_sample_value("gsam_stage_seconds_sum", {"stage": stage}) or 0.0 for stage in STAGES}


def run_fast(settings: Settings, blobs: dict[str, bytes], device: torch.device) -> tuple[dict, list[dict], Pipeline]:
    config = parse_label_config(CONFIG)
    pipeline = Pipeline(settings, loader=MemoryLoader(blobs, settings.max_image_pixels))
    urls = list(blobs)
    warm = urls[: pipeline.engine().batch_size]  # loads models, compiles, autotunes: not timed
    pipeline.predict_outcomes(request_for(warm, config))
    before = stage_seconds(pipeline)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    outcomes = pipeline.predict_outcomes(request_for(urls, config))
    sync(device)
    wall = time.perf_counter() - started
    failed = [o.error for o in outcomes if o.error]
    if failed:
        raise RuntimeError(f"fast path failed on {len(failed)} images: {failed[0]}")
    after = stage_seconds(pipeline)
    per_stage = {stage: 1000 * (after[stage] - before[stage]) / len(urls) for stage in STAGES}
    report = {
        "images": len(urls), "seconds": wall, "images_per_s": len(urls) / wall, "model_version": pipeline.model_version,
        "batch_size": pipeline.engine().batch_size,
        "stage_ms_per_image": per_stage,  # thread time: stages overlap, so these add up to more than wall
        "cpu_plumbing_ms_per_image": per_stage["images"] + per_stage["prepare"] + per_stage["regions"],
        "engine_busy_fraction": (after["engine"] - before["engine"]) / wall,
        "regions_per_image": sum(len(o.prediction["result"]) for o in outcomes) / len(urls),
        # Random-weight SAM draws ragged masks with many runs; real masks encode far smaller.
        "rle_bytes_per_mask": float(np.mean([len(r["value"]["rle"]) for o in outcomes for r in o.prediction["result"]
                                             if r["type"] == "brushlabels"] or [0])),
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    return report, [o.prediction for o in outcomes], pipeline


def model_breakdown(engine, blobs: list[bytes], settings: Settings, device: torch.device) -> dict:
    """Synchronised ms per image of the detector, the segmenter's encoder and its decoder + mask
    upsampling, on one batch (a detector + segmenter engine; SAM 3's is one model: whole ``run``)."""
    prepared = [engine.prepare(decode_image(b, settings.max_image_pixels)) for b in blobs]
    timings = {}

    def timed(name, fn):
        sync(device)
        started = time.perf_counter()
        value = fn()
        sync(device)
        timings[name] = 1000 * (time.perf_counter() - started) / len(prepared)
        return value

    with torch.inference_mode():
        if not isinstance(engine, Engine):
            timed("sam3_run", lambda: engine.run(prepared, [PHRASES] * len(prepared)))
            return timings
        detections = timed("dino", lambda: engine.detector.detect([p.dino for p in prepared], [PHRASES] * len(prepared)))
        embeddings = timed("sam_encoder", lambda: engine.segmenter.embed([p.sam for p in prepared]))
        boxes = [d.boxes for d in detections]
        if all(len(b) for b in boxes):
            timed("sam_decoder_and_masks", lambda: engine.segmenter._decode_boxes(embeddings, boxes))
    return timings


def memory_sweep(engine: Engine, device: torch.device, sizes: list[int]) -> dict[int, float | None]:
    """Peak GPU MiB above the loaded weights for one batch of each size (None: out of memory)."""
    peaks: dict[int, float | None] = {}
    for size in sizes:
        try:
            peaks[size] = measure_peak_bytes(device, engine.probe, size) / 2**20
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            peaks[size] = None
            break
    return peaks


def run_anchor(settings: Settings, blobs: list[bytes], device: torch.device) -> tuple[dict, list[dict]]:
    config = parse_label_config(CONFIG)
    anchor = AnchorPath(settings, device)
    anchor.predict(blobs[0], PHRASES, config, "anchor")  # warm-up, not timed
    sync(device)
    started = time.perf_counter()
    predictions = [anchor.predict(blob, PHRASES, config, "anchor") for blob in blobs]
    sync(device)
    wall = time.perf_counter() - started
    return {"images": len(blobs), "seconds": wall, "images_per_s": len(blobs) / wall}, predictions


def _box_iou(a: dict, b: dict) -> float:
    ax0, ay0, bx0, by0 = a["x"], a["y"], b["x"], b["y"]
    ax1, ay1, bx1, by1 = ax0 + a["width"], ay0 + a["height"], bx0 + b["width"], by0 + b["height"]
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a["width"] * a["height"] + b["width"] * b["height"] - inter
    return inter / union if union > 0 else 1.0


def agreement(fast: list[dict], anchor: list[dict]) -> dict:
    """How far the fast path's regions are from the anchor's, region by region in order."""
    box_ious, mask_ious, same_labels = [], [], 0
    for f, a in zip(fast, anchor):
        labels = [[r["type"], r["value"].get("rectanglelabels") or r["value"].get("brushlabels")] for r in f["result"]]
        same_labels += labels == [[r["type"], r["value"].get("rectanglelabels") or r["value"].get("brushlabels")]
                                  for r in a["result"]]
        for rf, ra in zip(f["result"], a["result"]):
            if rf["type"] == "rectanglelabels" and ra["type"] == "rectanglelabels":
                box_ious.append(_box_iou(rf["value"], ra["value"]))
            elif rf["type"] == "brushlabels" and ra["type"] == "brushlabels":
                shape = (rf["original_height"], rf["original_width"])
                mf, ma = rle_to_mask(rf["value"]["rle"], *shape), rle_to_mask(ra["value"]["rle"], *shape)
                union = (mf | ma).sum()
                mask_ious.append(float((mf & ma).sum() / union) if union else 1.0)

    def summary(values):
        return {"min": min(values), "mean": float(np.mean(values)), "n": len(values)} if values else None

    return {"images": len(anchor), "same_labels_fraction": same_labels / max(len(anchor), 1),
            "box_iou": summary(box_ious), "mask_iou": summary(mask_ious)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="fast-path images (default 256 cuda, 4 cpu)")
    parser.add_argument("--anchor-images", type=int, default=None, help="anchor images (default min(images, 32))")
    parser.add_argument("--models", choices=["real", "tiny"], default="real")
    parser.add_argument("--engine", default="grounded-sam",
                        help=f"the fast path's engine, or several comma-separated ({', '.join(ENGINES)}); the "
                             "anchor is LS's example path (DINO-T + SAM ViT-H), run once for all of them")
    parser.add_argument("--models-dir", type=Path, default=None, help="reuse built models from here")
    parser.add_argument("--batch-size", default="auto", help="a number or auto")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--memory-sweep", default="1,2,4,8,16,32", help="cuda: batch sizes to measure peak memory")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = args.images or (256 if device.type == "cuda" else 4)
    anchor_images = min(images, args.anchor_images or 32)

    engines = args.engine.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}: use {', '.join(ENGINES)} (comma-separated)")
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or Path(tmp)
        if not (models_dir / "sam" / "config.json").exists():
            build = make_real_size_models if args.models == "real" else make_tiny_models
            build(models_dir)
        blobs = {f"mem://{i}": jpeg(i) for i in range(images)}
        runs = {name: run_engine(name, models_dir, args, device, blobs) for name in engines}
        # The anchor (LS's example path) runs once, on the default pair, for every engine of this run.
        anchor_settings = Settings(grounding_dino_model=str(models_dir / "grounding-dino"),
                                   sam_model=str(models_dir / "sam"), device=args.device, dtype="float32",
                                   box_threshold=0.0, text_threshold=0.0, max_detections=5, embedding_cache_mb=0.0)
        anchor, anchor_predictions = run_anchor(anchor_settings, list(blobs.values())[:anchor_images], device)
    reports = []
    for name, (settings, fast, predictions, breakdown, sweep) in runs.items():
        reports.append({
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "models": args.models, "engine": name, "model_version": fast["model_version"],
            "dtype": str(settings.dtype or ("bfloat16" if device.type == "cuda" else "float32")),
            "compile": args.compile, "image_size": "1920x1080", "phrases": PHRASES, "fast": fast,
            "model_ms_per_image": breakdown, "peak_gpu_mib_by_batch": sweep,
            "anchor": anchor, "speedup": fast["images_per_s"] / anchor["images_per_s"],
            # Only the default engine runs the anchor's models: the others are compared for speed alone.
            "agreement": agreement(predictions[:anchor_images], anchor_predictions) if name == "grounded-sam" else None,
        })
    output = reports[0] if len(reports) == 1 else reports
    print(json.dumps(output, indent=2))
    if args.json:
        args.json.write_text(json.dumps(output, indent=2))


def run_engine(name: str, models_dir: Path, args, device: torch.device, blobs: dict[str, bytes]):
    """One engine's fast path: (settings, figures, predictions, model breakdown, memory sweep)."""
    family, chosen = ENGINES[name]
    if family and not (models_dir / family / "config.json").exists():
        make_family_model(models_dir, family, real_size=args.models == "real")
    chosen = {k: (v if isinstance(v, EngineKind) else str(models_dir / v)) for k, v in chosen.items()}
    models = {"grounding_dino_model": str(models_dir / "grounding-dino"), "sam_model": str(models_dir / "sam"),
              **chosen}
    settings = Settings(**models, device=args.device, dtype=args.dtype, box_threshold=0.0, text_threshold=0.0,
                        max_detections=5, batch_size=None if args.batch_size == "auto" else int(args.batch_size),
                        compile=args.compile, embedding_cache_mb=0.0)
    fast, predictions, pipeline = run_fast(settings, blobs, device)
    engine = pipeline.engine()
    breakdown = model_breakdown(engine, list(blobs.values())[: engine.batch_size], settings, device)
    sweep = memory_sweep(engine, device, [int(s) for s in args.memory_sweep.split(",")]) \
        if device.type == "cuda" else None
    del pipeline, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next engine's weights and the anchor's need the room
    return settings, fast, predictions, breakdown, sweep


if __name__ == "__main__":
    main()
