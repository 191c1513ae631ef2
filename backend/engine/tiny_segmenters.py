"""Random-weight SAM-HQ and SAM 2.1 checkpoints, built from configs and saved as normal model folders.

The companions of :mod:`backend.engine.tiny` for ``make-tiny-models --family sam-hq|sam2`` (see
``tiny.FAMILIES``): each builder writes the model and the processor config a hub checkpoint has,
so ``SAM_MODEL=DIR/sam-hq`` or ``DIR/sam2`` loads through the normal ``from_pretrained`` path.
``tiny``: a 256-pixel input and a few layers (seconds on a CPU); ``real``: the shapes of
sam-hq-vit-huge and sam2.1-hiera-large (for benchmarks; speed does not depend on weight values).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2Model,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQModel,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from backend.engine.tiny import (SAM_VISION_SIZES, TINY_SAM_DECODER, TINY_SAM_PROMPT, TINY_SAM_SIZE, TINY_SAM_VISION,
                                 tiny_sam_processor)

SAM2_SIZE = 1024  # SAM 2.1's input side


def _save(model_class, config, out_dir: Path, seed: int, write_processor) -> Path:
    torch.manual_seed(seed)
    model = model_class(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir)
    write_processor(out_dir)
    return out_dir


def build_tiny_sam_hq(out_dir: Path, seed: int = 0) -> Path:
    # vit_dim: HQ's decoder reads the ViT's first global-attention block, so it takes the ViT's width.
    config = SamHQConfig(vision_config=SamHQVisionConfig(**TINY_SAM_VISION),
                         prompt_encoder_config=SamHQPromptEncoderConfig(**TINY_SAM_PROMPT),
                         mask_decoder_config=SamHQMaskDecoderConfig(**TINY_SAM_DECODER,
                                                                    vit_dim=TINY_SAM_VISION["hidden_size"]))
    return _save(SamHQModel, config, out_dir, seed, tiny_sam_processor().save_pretrained)


def build_real_size_sam_hq(out_dir: Path, seed: int = 0) -> Path:
    """sam-hq-vit-huge's shapes, 1024 input."""
    vision = SAM_VISION_SIZES["vit-h"]
    config = SamHQConfig(vision_config=SamHQVisionConfig(**vision),
                         mask_decoder_config=SamHQMaskDecoderConfig(vit_dim=vision["hidden_size"]))
    return _save(SamHQModel, config, out_dir, seed, SamImageProcessorPil().save_pretrained)


def sam2_processor_config(size: int) -> dict:
    """The preprocessor_config.json of a SAM 2.1 hub checkpoint (input side ``size``), written as a
    dict: transformers' Sam2ImageProcessor needs torchvision to be constructed, and the segmenter
    only reads the values."""
    return {
        "image_processor_type": "Sam2ImageProcessor",
        "size": {"height": size, "width": size},
        "mask_size": {"height": size // 4, "width": size // 4},
        "image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD),
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "resample": 2,  # PIL bilinear
    }


def _sam2_writer(size: int):
    def write(out_dir: Path) -> None:
        (out_dir / "preprocessor_config.json").write_text(json.dumps(sam2_processor_config(size), indent=2) + "\n")
    return write


def tiny_sam2_vision(size: int, **fpn) -> Sam2VisionConfig:
    """A small Hiera at input side ``size``: four stages (stride 4, 8, 16, 32); the global-attention
    block must not be a stage's first (that one pools its queries); the three FPN levels are strides
    4, 8 and 16. ``fpn``: Sam2VisionConfig overrides (e.g. ``fpn_hidden_size``)."""
    backbone = Sam2HieraDetConfig(hidden_size=16, num_attention_heads=1, image_size=[size, size],
                                  blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                                  num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                                  global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
    return Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16],
                            backbone_feature_sizes=[[size // s, size // s] for s in (4, 8, 16)], **fpn)


def real_size_sam2_vision() -> Sam2VisionConfig:
    """sam2.1-hiera-large's image encoder (Hiera-L: 2-6-36-4 blocks, width 144), 1024 input."""
    backbone = Sam2HieraDetConfig(hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4],
                                  embed_dim_per_stage=[144, 288, 576, 1152],
                                  num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 16, 8],
                                  global_attention_blocks=[23, 33, 43])
    return Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[1152, 576, 288, 144])


def build_tiny_sam2(out_dir: Path, seed: int = 0) -> Path:
    size = TINY_SAM_SIZE
    vision = tiny_sam2_vision(size, fpn_hidden_size=32)
    prompt = Sam2PromptEncoderConfig(hidden_size=32, image_size=size, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    config = Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    return _save(Sam2Model, config, out_dir, seed, _sam2_writer(size))


def build_real_size_sam2(out_dir: Path, seed: int = 0) -> Path:
    """sam2.1-hiera-large's shapes, 1024 input."""
    return _save(Sam2Model, Sam2Config(vision_config=real_size_sam2_vision()), out_dir, seed, _sam2_writer(SAM2_SIZE))
