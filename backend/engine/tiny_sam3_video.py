"""Random-weight SAM 3 checkpoints that SAM 3's *video* model can run
(``make-tiny-models --family sam3-video``), laid out as ``facebook/sam3`` is (see
:mod:`backend.engine.tiny_sam3`); ENGINE=sam3 takes them as SAM3_MODEL for images and videos.

Why not the ``sam3`` family's tiny checkpoint: its tracker is 32 wide, and transformers 5.23's
video memory attention reads 64-channel memories whatever the config says (``kv_in_dim=64``) and
stacks object pointers of the tracker's width with them correctly only when that width is a
multiple of 64 above it (at 64 the shapes clash). So here the FPN, DETR, mask decoder and tracker
are 128 wide (they share that width); the ViT and the text encoder stay 32 wide. (The ``sam3``
family stays 32 wide: at 128 the FPN's CPU convolutions differ in the last bit between a batch of
one and of two, which ``tests/test_sam3.py`` checks exactly.)

Random weights would find nothing in a video: an instance's score, sigmoid(query logit) x
sigmoid(presence logit), is ~0.25 when both logits are ~0, under the video model's detection
(0.5) and new-object (0.7) thresholds, and the tracker's object-score head calls every object
absent half the time. So the builder sets three biases (:func:`make_visible`): the presence head's
last bias to +4, the query and text projections of the dot-product scoring to one shared constant
vector (every query's logit ~ +3: scores ~0.94 with a small spread), and the tracker's
object-score head to +4, as ``tiny_video`` does for SAM 2.1. And the tiny config confirms a track by
a detection from a mask IoU of :data:`TRACK_MATCH_IOU`. The weights stay random, fixed at build
time; what comes out is the model's own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import CLIPTokenizer, Sam3VideoConfig, Sam3VideoModel

from backend.engine.tiny_sam3 import TINY_SAM3_SIZE, _preprocessor_config, clip_byte_vocab, tiny_sam3_config

#: transformers' video memory attention reads 64-channel memories whatever the config says.
MEMORY_CHANNELS = 64
#: make_visible's biases: presence and tracker object-score logits, and the target query logit.
PRESENCE_BIAS = OBJECT_SCORE_BIAS = 4.0
QUERY_LOGIT = 3.0
#: The tiny model's mask IoU for "a detection confirms a track" (0.5 in facebook/sam3): its random
#: tracker and detector masks overlap ~0.45, so at 0.5 the hotstart rules would remove every
#: object after 8 frames.
TRACK_MATCH_IOU = 0.25


def make_visible(model: Sam3VideoModel) -> None:
    """Bias the random model so it detects and keeps objects (module docstring)."""
    detector = model.detector_model
    scoring = detector.dot_product_scoring
    # (q + c)·(t + c) / sqrt(D) ≈ c² sqrt(D) for the small random q, t: c = sqrt(logit / sqrt(D)).
    shared = math.sqrt(QUERY_LOGIT / math.sqrt(scoring.query_proj.out_features))
    with torch.no_grad():
        detector.detr_decoder.presence_head.layer3.bias.fill_(PRESENCE_BIAS)
        scoring.query_proj.bias.fill_(shared)
        scoring.text_proj.bias.fill_(shared)
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(OBJECT_SCORE_BIAS)


def _save(config: Sam3VideoConfig, size: int, out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = Sam3VideoModel(config).eval()
    make_visible(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    CLIPTokenizer(vocab=clip_byte_vocab(), merges=[]).save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(size), indent=2))
    return out_dir


def build_tiny_sam3_video(out_dir: Path, seed: int = 0) -> Path:
    """One or two layers, 112-pixel input, 20 queries; ViT and text encoder 32 wide, the rest 128."""
    config = tiny_sam3_config(width=2 * MEMORY_CHANNELS, narrow=32, memory_channels=MEMORY_CHANNELS,
                              trk_assoc_iou_thresh=TRACK_MATCH_IOU)
    return _save(config, TINY_SAM3_SIZE, out_dir, seed)


def build_real_size_sam3_video(out_dir: Path, seed: int = 0) -> Path:
    """facebook/sam3's shapes and config (only the text embedding table shrinks to the small
    vocab), with :func:`make_visible`'s biases. ~3.4 GB on disk in float32."""
    config = Sam3VideoConfig()
    text, vocab_size = config.detector_config.text_config, len(clip_byte_vocab())
    text.vocab_size, text.bos_token_id, text.eos_token_id, text.pad_token_id = (
        vocab_size, vocab_size - 2, vocab_size - 1, vocab_size - 1)
    return _save(config, config.detector_config.image_size, out_dir, seed)
