"""The real engine on tiny random-weight models: loading, frames, batching."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.engine.detector import nms
from backend.engine.device import resolve_device, resolve_dtype

REPO = Path(__file__).resolve().parent.parent


def shapes(width, height, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse([width // 4, height // 4, width // 2, height // 2], fill=(250, 20, 20))
    return image


IMAGES = [(320, 240, 0), (240, 320, 1), (301, 199, 2)]
PHRASES = [["circle", "square"], ["cat"], ["red car", "dog"]]


def test_detections_are_in_the_image_frame_and_name_prompt_phrases(engine):
    images = [shapes(*spec) for spec in IMAGES]
    for image, phrases, result in zip(images, PHRASES, engine.run(images, PHRASES)):
        assert 0 < len(result.detections) <= 5  # MAX_DETECTIONS=5, thresholds 0
        boxes = result.detections.boxes
        assert boxes.dtype == np.float32 and boxes.shape == (len(result.detections), 4)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= image.width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= image.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert set(result.detections.phrases) <= set(phrases)
        assert list(result.detections.scores) == sorted(result.detections.scores, reverse=True)
        assert result.full_masks().shape == (len(result.detections), image.height, image.width)
        assert result.full_masks().dtype == bool


def test_batched_equals_one_by_one(engine):
    images = [shapes(*spec) for spec in IMAGES]
    batched = engine.run(images, PHRASES)
    single = [engine.run([image], [phrases])[0] for image, phrases in zip(images, PHRASES)]
    for a, b in zip(batched, single):
        assert a.detections.phrases == b.detections.phrases
        np.testing.assert_allclose(a.detections.boxes, b.detections.boxes, atol=1e-3)
        for mask_a, mask_b in zip(a.full_masks(), b.full_masks()):
            union = (mask_a | mask_b).sum()
            assert union == 0 or (mask_a & mask_b).sum() / union >= 0.99


def test_no_phrases_or_no_boxes_skip_the_models(engine):
    image = shapes(64, 48, 3)
    result = engine.run([image], [[]])[0]
    assert len(result.detections) == 0 and result.full_masks().shape == (0, 48, 64)


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.5, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]


def test_device_and_dtype_resolution():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_phrase_spans_stay_aligned_with_the_prompt(engine):
    detector = engine.detector
    tokenizer = detector.tokenizer
    ids = np.array(tokenizer("red car . \u0007 . dog .")["input_ids"])  # the bell character tokenizes to nothing
    spans = detector._phrase_spans(ids, 3)
    assert len(spans) == 3 and spans[1][0] == spans[1][1]
    assert tokenizer.decode(ids[spans[0][0]:spans[0][1]]) == "red car"
    assert tokenizer.decode(ids[spans[2][0]:spans[2][1]]) == "dog"


@pytest.mark.parametrize("flush", ["1", "0"])
def test_the_engine_flushes_subnormal_floats_on_the_cpu_unless_told_not_to(tiny_env, flush):
    """FLUSH_DENORMALS (default on): once the engine has loaded, a product below float32's smallest
    normal number is zero (x86 would otherwise take a slow microcode path for each such operand).
    A fresh process: the flag is per thread and inherited, so the engine sets it before any torch work."""
    script = ("import torch; from backend.settings import Settings; from backend.engine.engine import build_engine; "
              "build_engine(Settings.from_env()); "
              "print(float(torch.tensor([1e-30]) * torch.tensor([1e-10])))")
    env = {**os.environ, **tiny_env, "FLUSH_DENORMALS": flush}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    product = float(done.stdout.strip().splitlines()[-1])
    assert (product == 0.0) if flush == "1" else (0.0 < product < 1.2e-38), product
