"""SAM-HQ: SAM with a high-quality output token, boxes or clicks → masks (transformers' SamHQModel).

Same input square, processor (``SamImageProcessorPil``), prompt frame and mask upsampling as SAM,
so :class:`SamHQSegmenter` is a :class:`SamSegmenter` whose embedding also holds what HQ's mask
decoder reads besides the image embedding: the output of the ViT's first global-attention block.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import SamHQModel

from backend.engine.segmenter import SamSegmenter


class SamHQSegmenter(SamSegmenter):
    """:class:`SamSegmenter` for SAM-HQ checkpoints (model_type ``sam_hq``).

    Its :class:`~backend.engine.segmenter.ImageEmbedding` holds two tensors: the image embedding
    (1, C, h, w) and the first global-attention block's output (1, h, w, D), channels last as the
    ViT emits it. SamHQModel returns every global block's output, but its mask decoder reads only
    the first (``intermediate_embeddings[0]``), so only that one is cached: a ViT-H embedding then
    costs 2x SAM's instead of 5x. ``tests/test_segmenters.py`` checks the masks equal
    SamHQModel's own forward from pixels, which passes all of them.
    """

    model_class = SamHQModel

    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeddings, intermediate = self.model.get_image_embeddings(pixels)
        return embeddings, intermediate[0]

    def _decoder_inputs(self, tensors: Sequence[torch.Tensor]) -> dict:
        return {"image_embeddings": tensors[0], "intermediate_embeddings": [tensors[1]]}
