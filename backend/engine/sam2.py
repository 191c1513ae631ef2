"""SAM 2.1 (image mode): boxes or clicks → masks with transformers' Sam2Model.

SAM 2 differs from SAM where :class:`SamSegmenter` has hooks: it stretches the image to its
(S, S) input (1024) without keeping the aspect ratio, so there is no padding; prompts go into that
frame by scaling x by S/W and y by S/H; its image embedding is three feature levels (the decoder
takes the two high-resolution ones too); its low-resolution logits are upsampled straight to the
image's size. Its processor (``Sam2ImageProcessor``) needs torchvision, so the values are read
from the checkpoint's preprocessor_config.json and the resize is PIL's.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from transformers import Sam2Model
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from backend.engine.masks import MaskJob
from backend.engine.preprocess import Normalizer
from backend.engine.segmenter import ImageEmbedding, SamSegmenter

# Sam2ImageProcessor's class defaults, for keys a preprocessor_config.json leaves out.
PROCESSOR_DEFAULTS = {"size": {"height": 1024, "width": 1024}, "image_mean": IMAGENET_DEFAULT_MEAN,
                      "image_std": IMAGENET_DEFAULT_STD, "rescale_factor": 1 / 255, "do_rescale": True,
                      "do_normalize": True, "resample": PILImageResampling.BILINEAR}


def read_processor_config(source: str) -> SimpleNamespace:
    """The SAM 2 processor settings of ``source`` (hub id or directory), over the class defaults."""
    config, _ = ImageProcessingMixin.get_image_processor_dict(source)
    values = {**PROCESSOR_DEFAULTS, **{k: v for k, v in config.items() if k in PROCESSOR_DEFAULTS}}
    size = values["size"]
    if size.get("height") != size.get("width") or not size.get("height"):
        raise ValueError(f"{source}: SAM 2's preprocessor size must be a square {{'height': S, 'width': S}}, "
                         f"got {size}: fix preprocessor_config.json")
    return SimpleNamespace(**values)


class Sam2Segmenter(SamSegmenter):
    """:class:`SamSegmenter` for SAM 2.1 checkpoints (model_type ``sam2``).

    Its :class:`~backend.engine.segmenter.ImageEmbedding` holds the three feature levels
    ``Sam2Model.get_image_embeddings`` returns, highest resolution first ((1, C/8, S/4, S/4),
    (1, C/4, S/8, S/8), (1, C, S/16, S/16)); ``nbytes`` is their sum. ``reshaped_size`` is (S, S).
    """

    model_class = Sam2Model

    def _load_processor(self, source: str) -> None:
        self.image_processor = read_processor_config(source)
        self.square = int(self.image_processor.size["height"])
        self.resample = PILImageResampling(self.image_processor.resample)
        self.normalize = Normalizer(self.image_processor)

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        return self.square, self.square

    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.get_image_embeddings(pixels))

    def _decoder_inputs(self, tensors: Sequence[torch.Tensor]) -> dict:
        return {"image_embeddings": list(tensors)}

    def _to_sam_frame(self, coords: np.ndarray, embedding: ImageEmbedding, is_box: bool) -> np.ndarray:
        """Pixel XY (points (..., 2), boxes (..., 4) XYXY) → the (S, S) input frame, as
        ``Sam2Processor._normalize_coordinates`` does."""
        height, width = embedding.original_size
        scale = np.array([self.square / width, self.square / height] * (2 if is_box else 1))
        return np.asarray(coords, np.float64) * scale

    def _mask_job(self, logits: torch.Tensor, embedding: ImageEmbedding) -> MaskJob:
        """The square holds the whole image, stretched: the logits go straight to the original size."""
        return MaskJob(logits, None, None, embedding.original_size)
