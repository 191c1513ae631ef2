"""Random-weight SAM 2.1 *video* checkpoints (``make-tiny-models --family sam2-video``), saved as
normal model folders that ``TRACKER_MODEL`` loads through ``Sam2VideoModel.from_pretrained``.

``tiny``: a 256-pixel input, a small Hiera and one memory-attention layer (a 50-frame clip
tracks in seconds on a CPU); ``real``: sam2.1-hiera-large's shapes at 1024 (for benchmarks).
The memory path keeps SAM 2.1's widths (256, and 64 for the memory features, which transformers
hard-codes in the memory attention's cross-attention).

Random weights would call every object absent (the object-score head's output is about 0 and
then every mask is replaced by "no object"), and a track would never have a box. So the builder
sets that head's last bias to +4 (objects visible) and the mask decoder's hypernetwork output bias
so that masks are not empty: the checkpoint still holds random weights, fixed at build time; its
outputs are the model's own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VideoConfig, Sam2VideoModel

from backend.engine.tiny import TINY_SAM_SIZE
from backend.engine.tiny_segmenters import SAM2_SIZE, _sam2_writer, real_size_sam2_vision, tiny_sam2_vision

#: The object-score head's bias in tiny checkpoints: sigmoid(4) = 0.98, "visible".
VISIBLE_BIAS = 4.0


def _save(config: Sam2VideoConfig, out_dir: Path, seed: int, size: int, visible: bool) -> Path:
    torch.manual_seed(seed)
    model = Sam2VideoModel(config).eval()
    if visible:
        with torch.no_grad():
            head = model.mask_decoder.pred_obj_score_head
            head.proj_out.bias.fill_(VISIBLE_BIAS)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _sam2_writer(size)(out_dir)
    return out_dir


def build_tiny_sam2_video(out_dir: Path, seed: int = 0) -> Path:
    size = TINY_SAM_SIZE
    config = Sam2VideoConfig(
        vision_config=tiny_sam2_vision(size), image_size=size,
        prompt_encoder_config=Sam2PromptEncoderConfig(image_size=size, patch_size=16),
        mask_decoder_config=Sam2MaskDecoderConfig(mlp_dim=64, iou_head_hidden_dim=32),
        memory_attention_rope_feat_sizes=[size // 16, size // 16], memory_attention_feed_forward_hidden_size=64,
        memory_attention_num_layers=1, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1)
    return _save(config, out_dir, seed, size, visible=True)


def build_real_size_sam2_video(out_dir: Path, seed: int = 0) -> Path:
    """sam2.1-hiera-large's shapes, 1024 input."""
    return _save(Sam2VideoConfig(vision_config=real_size_sam2_vision()), out_dir, seed, SAM2_SIZE, visible=True)
