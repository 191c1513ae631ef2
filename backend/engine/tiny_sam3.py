"""Random-weight SAM 3 checkpoints laid out as ``facebook/sam3`` is, for tests and benchmarks.

The hub checkpoint is a ``sam3_video`` model: one config with a ``detector_config`` (``Sam3Model``:
text → instances) and a ``tracker_config`` (the SAM-2-style tracker: clicks/boxes → masks), and
one set of weights, ``detector_model.*``, ``tracker_model.*`` and ``tracker_neck.*`` (the tracker
has its own FPN neck on the detector's ViT backbone, which the two share). Saving a
``Sam3VideoModel`` writes exactly that, so these folders load through the same code as the real
one. Beside it: a CLIP tokenizer with a small byte-level vocab (every text tokenizes, one token per
byte) and the ``preprocessor_config.json`` of the hub checkpoint (``Sam3ImageProcessor``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, Sam3VideoConfig, Sam3VideoModel

TINY_SAM3_SIZE = 112  # 8x8 patches of 14 pixels
PATCH = 14


def clip_byte_vocab() -> dict[str, int]:
    """A CLIP BPE vocab without merges: the 256 byte symbols, each again with CLIP's end-of-word
    suffix, then <|startoftext|> and <|endoftext|> (CLIP's specials, last as in the real vocab)."""
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _preprocessor_config(size: int) -> dict:
    """The hub checkpoint's preprocessor_config.json, at ``size`` (1008 there)."""
    low_res = 4 * (size // PATCH)  # the detector's and tracker's mask logits: 4x the patch grid
    return {
        "image_processor_type": "Sam3ImageProcessor", "processor_class": "Sam3Processor",
        "do_convert_rgb": True, "do_resize": True, "size": {"height": size, "width": size},
        "mask_size": {"height": low_res, "width": low_res}, "resample": 2,  # bilinear
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }


def _save_sam3(config: Sam3VideoConfig, size: int, out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = Sam3VideoModel(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    CLIPTokenizer(vocab=clip_byte_vocab(), merges=[]).save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(size), indent=2))
    return out_dir


def _fix_feature_sizes(config: Sam3VideoConfig, size: int) -> Sam3VideoConfig:
    # The tracker's sub-configs are built with the 1008-pixel sizes whatever is passed; the
    # config's own setter propagates the input size to every part that derives sizes from it.
    config.image_size = size
    grid = size // PATCH
    sizes = [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]
    config.detector_config.vision_config.backbone_feature_sizes = sizes
    config.tracker_config.vision_config.backbone_feature_sizes = sizes
    return config


def tiny_sam3_config(width: int = 32, narrow: int | None = None, memory_channels: int = 16,
                     **video) -> Sam3VideoConfig:
    """A tiny ``sam3_video`` config: one or two layers, 112-pixel input, 20 queries, every part
    ``width`` wide except the ViT and the text encoder (``narrow``, default ``width``); the
    tracker's memory features ``memory_channels`` wide. ``video``: Sam3VideoConfig overrides."""
    size, grid = TINY_SAM3_SIZE, TINY_SAM3_SIZE // PATCH
    narrow = narrow or width
    vit = dict(model_type="sam3_vit_model", hidden_size=narrow, intermediate_size=2 * narrow, num_hidden_layers=2,
               num_attention_heads=2, image_size=size, patch_size=PATCH, window_size=4, global_attn_indexes=[1],
               pretrain_image_size=56)
    vision = dict(model_type="sam3_vision_model", backbone_config=vit, fpn_hidden_size=width)
    small = dict(hidden_size=width, num_attention_heads=2, intermediate_size=2 * width)
    vocab_size = len(clip_byte_vocab())
    detector = dict(
        model_type="sam3", vision_config=vision,
        text_config=dict(model_type="clip_text_model", vocab_size=vocab_size, hidden_size=narrow,
                         intermediate_size=2 * narrow, projection_dim=narrow, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        geometry_encoder_config=dict(small, num_layers=1, roi_size=2),
        detr_encoder_config=dict(small, num_layers=1),
        detr_decoder_config=dict(small, num_layers=1, num_queries=20),
        mask_decoder_config=dict(hidden_size=width, num_attention_heads=2))
    tracker = dict(
        model_type="sam3_tracker_video", vision_config=vision,
        prompt_encoder_config=dict(hidden_size=width, image_size=size, patch_size=PATCH),
        mask_decoder_config=dict(hidden_size=width, mlp_dim=2 * width, num_attention_heads=2, iou_head_hidden_dim=width),
        memory_attention_hidden_size=width, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=2 * width, memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=width, memory_encoder_output_channels=memory_channels,
        mask_downsampler_embed_dim=width, memory_fuser_embed_dim=width, memory_fuser_intermediate_dim=2 * width,
        memory_fuser_num_layers=1)
    config = Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * grid, **video)
    return _fix_feature_sizes(config, size)


def build_tiny_sam3(out_dir: Path, seed: int = 0) -> Path:
    """Every part of SAM 3 at width 32 (:func:`tiny_sam3_config`)."""
    return _save_sam3(tiny_sam3_config(), TINY_SAM3_SIZE, out_dir, seed)


def build_real_size_sam3(out_dir: Path, seed: int = 0) -> Path:
    """facebook/sam3's shapes (ViT-L-sized PE backbone, 1008 input, 200 queries); only the text
    embedding table shrinks to the small vocab. ~3.4 GB on disk in float32."""
    config = Sam3VideoConfig()
    text, vocab_size = config.detector_config.text_config, len(clip_byte_vocab())
    text.vocab_size, text.bos_token_id, text.eos_token_id, text.pad_token_id = (
        vocab_size, vocab_size - 2, vocab_size - 1, vocab_size - 1)
    return _save_sam3(config, config.detector_config.image_size, out_dir, seed)
