"""The fast engine path on tiny random-weight models (CPU): device-side mask upsampling, the
pipelined Pipeline, COMPILE=1, BATCH_SIZE=auto, and equivalence with the anchor path (fp32)."""

import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.engine.engine import Engine
from backend.engine.compiling import batch_bucket, batch_buckets, pad_rows
from backend.engine.device import CPU_BATCH_SIZE, batch_size_for_memory
from backend.engine.masks import chunk_size, upsample_masks
from backend.ls.labelconfig import parse_label_config
from backend.pipeline.predict import Pipeline
from backend.results import CompactMask
from backend.settings import Settings
from bench.anchor import AnchorPath
from bench.pipeline import CONFIG, PHRASES, MemoryLoader, agreement, jpeg, request_for

REPO = Path(__file__).resolve().parent.parent



# ------------------------------------------------------------------ masks on the device

@pytest.mark.parametrize("original, reshaped", [((199, 301), (170, 256)), ((411, 97), (256, 61)), ((48, 64), (192, 256))])
def test_device_upsampling_equals_the_processors_post_process_masks(tiny_settings, original, reshaped):
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    processor = SamImageProcessorPil.from_pretrained(tiny_settings.sam_model)
    generator = torch.Generator().manual_seed(sum(original))
    logits = torch.randn(7, 64, 64, generator=generator) * 4
    logits[3] = -10  # an empty mask
    reference = processor.post_process_masks([logits[:, None].clone()], [original], [reshaped])[0][:, 0].numpy()
    for budget in (1, 2**30):  # one mask per chunk, and all at once
        masks = upsample_masks(logits, 256, reshaped, original, budget_bytes=budget)
        assert np.array_equal(np.stack([m.full() for m in masks]), reference)
    assert masks[3].is_empty and masks[3].box() is None
    assert chunk_size(6000, 4000, 1024, 512 * 2**20) == 4  # 24 MP: (4 + 1 bytes) x 24 MP + 4 MB each


def test_compact_mask_holds_only_the_foreground_box():
    full = np.zeros((40, 60), bool)
    full[10:20, 5:9] = True
    full[25, 30] = True
    mask = CompactMask.from_full(full)
    assert (mask.top, mask.bottom, mask.left, mask.right) == (10, 26, 5, 31)
    assert mask.crop.shape == (16, 26) and np.array_equal(mask.full(), full)
    assert np.array_equal(mask.band(), full[10:26]) and mask.box().tolist() == [5, 10, 31, 26]
    assert CompactMask.from_full(np.zeros((3, 4))).is_empty


# ------------------------------------------------------------------ fast path == anchor path

def test_fast_path_gives_the_anchor_paths_detections_and_masks_in_fp32(tiny_settings):
    """Batched, pipelined, device-upsampled, band-RLE fast path vs the LS example's way, same weights."""
    settings = replace(tiny_settings, batch_size=3, embedding_cache_mb=0.0)
    sizes = [(1920, 1080), (1080, 1920), (640, 480), (301, 199), (1920, 1080)]
    blobs = {f"mem://{i}": jpeg(i, *size) for i, size in enumerate(sizes)}
    config = parse_label_config(CONFIG)
    pipeline = Pipeline(settings, loader=MemoryLoader(blobs, settings.max_image_pixels))
    fast = [o.prediction for o in pipeline.predict_outcomes(request_for(list(blobs), config))]
    anchor = AnchorPath(settings, torch.device("cpu"))
    slow = [anchor.predict(blob, PHRASES, config, "anchor") for blob in blobs.values()]
    figures = agreement(fast, slow)
    assert figures["same_labels_fraction"] == 1.0
    assert figures["box_iou"]["n"] == figures["mask_iou"]["n"] == 5 * len(sizes)  # MAX_DETECTIONS=5
    assert figures["box_iou"]["min"] >= 0.98 and figures["mask_iou"]["min"] >= 0.98


@pytest.mark.parametrize("engine", ["grounded-sam", "sam-hq", "sam2", "mm-grounding-dino", "sam3"])
def test_benchmark_cpu_smoke(engine, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "bench/pipeline.py", "--device", "cpu", "--models", "tiny", "--images", "4",
                    "--anchor-images", "2", "--engine", engine, "--models-dir", str(tmp_path / "models"),
                    "--json", str(out)], cwd=REPO, check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["engine"] == engine and report["fast"]["images"] == 4 and report["anchor"]["images"] == 2
    assert report["fast"]["images_per_s"] > 0 and report["speedup"] > 0
    assert set(report["fast"]["stage_ms_per_image"]) == {"images", "prepare", "engine", "regions"}
    if engine == "sam3":
        assert set(report["model_ms_per_image"]) == {"sam3_run"} and report["agreement"] is None
    elif engine == "grounded-sam":
        assert set(report["model_ms_per_image"]) == {"dino", "sam_encoder", "sam_decoder_and_masks"}
        assert report["agreement"]["mask_iou"]["min"] >= 0.98  # fp32 on the CPU, the anchor's own models
    else:
        assert set(report["model_ms_per_image"]) == {"dino", "sam_encoder", "sam_decoder_and_masks"}
        assert report["agreement"] is None


# ------------------------------------------------------------------ pipelining

class RecordingEngine:
    """The real engine, recording when each ``run`` starts (instrumentation, not a stub)."""

    def __init__(self, engine: Engine):
        self.engine, self.started = engine, threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, *args, **kwargs):
        self.started.set()
        return self.engine.run(*args, **kwargs)


def test_images_load_while_the_engine_runs_and_order_survives_failures(tiny_settings):
    settings = replace(tiny_settings, batch_size=2)
    blobs = {f"mem://{i}": jpeg(i, 320, 240) for i in range(7)}
    urls = list(blobs)
    urls[3] = "mem://missing"  # fails to load: an empty prediction in its place
    engine = RecordingEngine(Engine.from_settings(settings))
    overlapped = []

    class GatedLoader(MemoryLoader):
        def load(self, url, task_id=None, defer=False):
            if url != urls[0] and url != urls[1]:
                # Images after the first batch wait until the engine has started: a pipeline that
                # loaded everything before running the engine would time out here.
                overlapped.append(engine.started.wait(timeout=60))
            if url not in self.blobs:
                from backend.images.decode import ImageError
                raise ImageError(f"{url}: no such image")
            return super().load(url, task_id, defer)

    pipeline = Pipeline(settings, engine_factory=lambda: engine, loader=GatedLoader(blobs, settings.max_image_pixels))
    outcomes = pipeline.predict_outcomes(request_for(urls, parse_label_config(CONFIG)))
    assert overlapped and all(overlapped)
    assert [o.error is not None for o in outcomes] == [i == 3 for i in range(7)]
    alone = Pipeline(settings, engine_factory=lambda: engine.engine, loader=MemoryLoader(blobs, settings.max_image_pixels))
    loaded = [url for url in urls if url in blobs]
    expected = [alone.predict_outcomes(request_for([url], parse_label_config(CONFIG)))[0].prediction for url in loaded]
    figures = agreement([o.prediction for o, url in zip(outcomes, urls) if url in blobs], expected)
    assert figures["same_labels_fraction"] == 1.0  # each answer belongs to its own task
    assert figures["box_iou"]["min"] >= 0.99 and figures["mask_iou"]["min"] >= 0.99


# ------------------------------------------------------------------ COMPILE=1

def test_compiled_engine_matches_eager_and_does_not_recompile_per_image_size(tiny_settings):
    from torch._dynamo.utils import counters

    # Batch size 1: one bucket (each bucket compiles ~10 graphs of the tiny models, ~5 s each on a CPU).
    eager = Engine.from_settings(replace(tiny_settings, batch_size=1))
    compiled = Engine.from_settings(replace(tiny_settings, batch_size=1, compile=True))
    graphs = counters["stats"]["unique_graphs"]  # ready means compiled: both canvases, at load
    assert graphs > 0
    compiled.run([jpeg_image(320, 240, 0), jpeg_image(180, 300, 2)], [PHRASES, PHRASES])  # landscape, portrait
    other_size = [jpeg_image(300, 180, 1)]  # same orientation, other size: same canvas and batch bucket
    got = compiled.run(other_size, [PHRASES])[0]
    assert counters["stats"]["unique_graphs"] == graphs
    want = eager.run(other_size, [PHRASES])[0]
    assert got.detections.phrases == want.detections.phrases
    np.testing.assert_allclose(got.detections.boxes, want.detections.boxes, atol=1e-3)
    assert all(np.array_equal(a.full(), b.full()) for a, b in zip(got.masks, want.masks))


def jpeg_image(width, height, seed):
    from backend.images.decode import decode_image

    return decode_image(jpeg(seed, width, height), 10**8)


def test_batch_buckets_and_padding():
    # Two buckets: one item (a click, a single task) or the worker's batch size (a straggler pads up).
    assert [batch_bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 8, 8, 8, 8]
    assert batch_bucket(5, 6) == 6 and batch_bucket(1, 6) == 1
    assert batch_buckets(8) == [1, 8] and batch_buckets(1) == [1]
    padded = pad_rows(torch.arange(6).reshape(3, 2), 4)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]
    with pytest.raises(ValueError, match="at least one"):
        batch_bucket(0, 8)


# ------------------------------------------------------------------ BATCH_SIZE=auto

def test_batch_size_from_free_memory():
    gib = 2**30
    assert batch_size_for_memory(10 * gib, 1 * gib, gib // 2) == 14  # (0.8 * 10 - 1) / 0.5
    assert batch_size_for_memory(10 * gib, 1 * gib, gib // 100) == 32  # capped
    assert batch_size_for_memory(1 * gib, 2 * gib, gib) == 1  # never below one


def test_auto_batch_size_on_the_cpu_and_the_compile_setting(tiny_settings):
    settings = Settings.from_env({"BATCH_SIZE": "auto", "COMPILE": "1", "GROUNDING_DINO_MODEL": "x", "SAM_MODEL": "y"})
    assert settings.batch_size is None and settings.compile is True
    engine = Engine.from_settings(replace(tiny_settings, batch_size=None))
    assert engine.batch_size == CPU_BATCH_SIZE == engine.segmenter.batch_size


# ------------------------------------------------------------------ preprocessing split host/device

@pytest.mark.parametrize("width, height", [(1920, 1080), (1080, 1920), (301, 199)])
def test_host_resize_plus_device_normalize_equals_the_processors(engine, width, height):
    image = jpeg_image(width, height, 7)
    prepared = engine.prepare(image)
    detector, segmenter = engine.detector, engine.segmenter
    canvas = prepared.dino.canvas.shape
    want = detector.image_processor(images=[image], return_tensors="pt", pad_size={"height": canvas[0], "width": canvas[1]})
    pixels, valid = detector.normalize([prepared.dino.canvas], torch.device("cpu"), torch.float32)
    torch.testing.assert_close(pixels, want["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(valid.long(), want["pixel_mask"])
    want = segmenter.image_processor(images=[image], return_tensors="pt")
    pixels, _ = segmenter.normalize([prepared.sam.canvas], torch.device("cpu"), torch.float32)
    torch.testing.assert_close(pixels, want["pixel_values"], atol=1e-5, rtol=0)
    assert prepared.sam.reshaped_size == tuple(want["reshaped_input_sizes"][0].tolist())
