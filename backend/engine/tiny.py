"""Random-weight Grounding DINO and SAM, built from configs and saved as normal model folders.

No weights can be downloaded in CI, so tests and a first try load these with the same
``from_pretrained`` code that loads the real hub models. Their outputs are meaningless but
deterministic for a given seed; their shapes, frames and processors are the real ones.

Two sizes: ``tiny`` (tests, a first try: seconds on a CPU) and ``real`` (the shapes of
grounding-dino-tiny and sam-vit-huge, for benchmarks: speed does not depend on weight values).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
)
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

TINY_DINO_SIZE = {"shortest_edge": 200, "longest_edge": 333}
TINY_SAM_SIZE = 256


def bert_compatible_vocab() -> list[str]:
    """A WordPiece vocab whose special ids equal bert-base-uncased's.

    Grounding DINO hard-codes [CLS]=101, [SEP]=102, '.'=1012 and '?'=1029 to split phrases, so those
    must sit at the same ids. As in bert-base-uncased, ids 999+ hold the printable ASCII characters
    without upper case; '##'-continuations of letters and digits follow, so any lower-case word
    tokenizes into pieces and decodes back to itself.
    """
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 994)]
    vocab += [chr(code) for code in range(33, 127) if not chr(code).isupper()]
    vocab += ["##" + char for char in string.ascii_lowercase + string.digits]
    return vocab


def _check_special_ids(vocab: list[str]) -> None:
    expected = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}
    actual = {token: vocab.index(token) for token in expected}
    if actual != expected:
        raise RuntimeError(f"tiny vocab ids {actual} differ from bert-base-uncased's {expected}")


def _save_grounding_dino(config: GroundingDinoConfig | MMGroundingDinoConfig, vocab: list[str], image_processor,
                         out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model_class = MMGroundingDinoForObjectDetection if config.model_type == "mm-grounding-dino" else \
        GroundingDinoForObjectDetection
    model = model_class(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


def _tiny_dino_config(config_class, vocab: list[str]):
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    # decoder_layers=2: transformers ties bbox heads across decoder layers and refuses a single one.
    # d_model=32: the input projections' GroupNorm has 32 groups.
    return config_class(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=30, encoder_n_points=2, decoder_n_points=2, max_text_len=64)


def build_tiny_grounding_dino(out_dir: Path, seed: int = 0) -> Path:
    vocab = bert_compatible_vocab()
    _check_special_ids(vocab)
    config = _tiny_dino_config(GroundingDinoConfig, vocab)
    return _save_grounding_dino(config, vocab, GroundingDinoImageProcessorPil(size=TINY_DINO_SIZE), out_dir, seed)


def build_tiny_mm_grounding_dino(out_dir: Path, seed: int = 0) -> Path:
    """MM-Grounding-DINO (model_type ``mm-grounding-dino``, as mm_grounding_dino_* and LLMDet) at the
    tiny size: the same BERT tokenizer and image processor as Grounding DINO, its own model class."""
    vocab = bert_compatible_vocab()
    _check_special_ids(vocab)
    config = _tiny_dino_config(MMGroundingDinoConfig, vocab)
    return _save_grounding_dino(config, vocab, GroundingDinoImageProcessorPil(size=TINY_DINO_SIZE), out_dir, seed)


def build_real_size_grounding_dino(out_dir: Path, seed: int = 0) -> Path:
    """grounding-dino-tiny's shapes: Swin-T, BERT-base (a small vocab: only the embedding table
    shrinks), 900 queries, 800x1333 input."""
    vocab = bert_compatible_vocab()
    _check_special_ids(vocab)
    config = GroundingDinoConfig(text_config=BertConfig(vocab_size=len(vocab)))
    return _save_grounding_dino(config, vocab, GroundingDinoImageProcessorPil(), out_dir, seed)


def build_real_size_mm_grounding_dino(out_dir: Path, seed: int = 0) -> Path:
    """mm_grounding_dino_tiny_o365v1_goldg's shapes: as :func:`build_real_size_grounding_dino`."""
    vocab = bert_compatible_vocab()
    _check_special_ids(vocab)
    config = MMGroundingDinoConfig(text_config=BertConfig(vocab_size=len(vocab)))
    return _save_grounding_dino(config, vocab, GroundingDinoImageProcessorPil(), out_dir, seed)


def _save_sam(config: SamConfig, image_processor, out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = SamModel(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


#: The tiny SAM's sub-configs, shared by the SAM-HQ build (backend.engine.tiny_segmenters).
TINY_SAM_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, output_channels=32,
                       image_size=TINY_SAM_SIZE, patch_size=16, window_size=4, global_attn_indexes=[1],
                       num_pos_feats=16)
TINY_SAM_PROMPT = dict(hidden_size=32, image_size=TINY_SAM_SIZE, patch_size=16, mask_input_channels=4)
TINY_SAM_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                        iou_head_hidden_dim=32)


def tiny_sam_processor() -> SamImageProcessorPil:
    """SAM's processor at the tiny input size (SAM-HQ uses the same one)."""
    low_res = TINY_SAM_SIZE // 4  # SAM's decoder upsamples the embedding grid 4x
    return SamImageProcessorPil(
        size={"longest_edge": TINY_SAM_SIZE}, pad_size={"height": TINY_SAM_SIZE, "width": TINY_SAM_SIZE},
        mask_size={"longest_edge": low_res}, mask_pad_size={"height": low_res, "width": low_res})


def build_tiny_sam(out_dir: Path, seed: int = 0) -> Path:
    config = SamConfig(vision_config=SamVisionConfig(**TINY_SAM_VISION),
                       prompt_encoder_config=SamPromptEncoderConfig(**TINY_SAM_PROMPT),
                       mask_decoder_config=SamMaskDecoderConfig(**TINY_SAM_DECODER))
    return _save_sam(config, tiny_sam_processor(), out_dir, seed)


SAM_VISION_SIZES = {  # SamVisionConfig of the published checkpoints (all 1024 input, patch 16)
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_dim=3072,
                  global_attn_indexes=[2, 5, 8, 11]),
    "vit-h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
                  global_attn_indexes=[7, 15, 23, 31]),
}


def build_real_size_sam(out_dir: Path, seed: int = 0, size: str = "vit-h") -> Path:
    """sam-vit-huge's shapes (or sam-vit-base's with ``size="vit-b"``), 1024 input."""
    vision = SamVisionConfig(**SAM_VISION_SIZES[size])
    return _save_sam(SamConfig(vision_config=vision), SamImageProcessorPil(), out_dir, seed)


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out_dir/grounding-dino`` and ``out_dir/sam``; returns their paths."""
    root = Path(out_dir)
    return build_tiny_grounding_dino(root / "grounding-dino", seed), build_tiny_sam(root / "sam", seed)


def make_real_size_models(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Like :func:`make_tiny_models` at the real models' sizes (~3.3 GB on disk in float32)."""
    root = Path(out_dir)
    return build_real_size_grounding_dino(root / "grounding-dino", seed), build_real_size_sam(root / "sam", seed)


#: ``make-tiny-models --family``: family → (module, tiny builder, real-size builder). Each builder
#: is ``build(out_dir: Path, seed: int = 0) -> Path`` and writes a checkpoint directory that loads
#: through the normal settings (SAM_MODEL, GROUNDING_DINO_MODEL, SAM3_MODEL).
FAMILIES = {
    "sam-hq": ("backend.engine.tiny_segmenters", "build_tiny_sam_hq", "build_real_size_sam_hq"),
    "sam2": ("backend.engine.tiny_segmenters", "build_tiny_sam2", "build_real_size_sam2"),
    "sam2-video": ("backend.engine.tiny_video", "build_tiny_sam2_video", "build_real_size_sam2_video"),
    "sam3": ("backend.engine.tiny_sam3", "build_tiny_sam3", "build_real_size_sam3"),
    "sam3-video": ("backend.engine.tiny_sam3_video", "build_tiny_sam3_video", "build_real_size_sam3_video"),
    "mm-grounding-dino": ("backend.engine.tiny", "build_tiny_mm_grounding_dino", "build_real_size_mm_grounding_dino"),
}


def make_family_model(out_dir: str | Path, family: str, seed: int = 0, real_size: bool = False) -> Path:
    """Write ``out_dir/family`` (a random-weight checkpoint of ``family``, see :data:`FAMILIES`)."""
    import importlib

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
    module, tiny, real = FAMILIES[family]
    build = getattr(importlib.import_module(module), real if real_size else tiny)
    return build(Path(out_dir) / family, seed)
