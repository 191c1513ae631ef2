"""The anchor path: what Label Studio's own ``grounding_sam`` example does, on the same weights.

Per image, one at a time, in float32: decode, Grounding DINO on that image alone, SAM's encoder
on that image (no embedding reuse), the decoder on its boxes, masks upsampled on the CPU by the
transformers processor (``post_process_masks``: float32 at full size), and each mask encoded with
``label_studio_sdk``'s ``mask2rle``. DINO's thresholds, phrase grounding and NMS are the fast
path's own (``GroundingDinoDetector`` with batch 1), so the two paths differ only in how they
compute, which makes the equivalence check and the speed ratio meaningful. How that detector
differs from transformers' own ``GroundingDinoProcessor.post_process_grounded_object_detection``
(and where it equals it) is pinned by ``tests/test_detector_reference.py``, not measured here.
"""

from __future__ import annotations

import numpy as np
import torch
from label_studio_sdk.converter import brush
from transformers import SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from backend.engine.detector import GroundingDinoDetector
from backend.images.decode import decode_image
from backend.ls.labelconfig import LabelConfig
from backend.ls.regions import build_prediction
from backend.results import CompactMask, ImageResult
from backend.settings import Settings


def sdk_rle(mask: CompactMask) -> list[int]:
    """The SDK's RLE of the whole (H, W) mask, as the example calls it."""
    return brush.mask2rle(mask.full().astype(np.uint8) * 255)


class AnchorPath:
    """``predict(jpeg_bytes, phrases, config)`` → one LS prediction, the slow reference way."""

    def __init__(self, settings: Settings, device: torch.device):
        self.device, self.settings = device, settings
        self.detector = GroundingDinoDetector(
            settings.grounding_dino_model, device, torch.float32, box_threshold=settings.box_threshold,
            text_threshold=settings.text_threshold, nms_threshold=settings.nms_threshold,
            max_detections=settings.max_detections, batch_size=1)
        self.processor = SamProcessor(image_processor=SamImageProcessorPil.from_pretrained(settings.sam_model))
        # segment-anything's own attention is the eager kind
        self.sam = SamModel.from_pretrained(settings.sam_model, dtype=torch.float32,
                                            attn_implementation="eager").to(device).eval()

    @torch.inference_mode()
    def predict(self, data: bytes, phrases: list[str], config: LabelConfig, model_version: str) -> dict:
        image = decode_image(data, self.settings.max_image_pixels)
        detections = self.detector.detect([image], [phrases])[0]
        masks: tuple[CompactMask, ...] = ()
        if len(detections):
            inputs = self.processor(images=image, input_boxes=[detections.boxes.tolist()], return_tensors="pt")
            embeddings = self.sam.get_image_embeddings(inputs["pixel_values"].to(self.device))
            outputs = self.sam(image_embeddings=embeddings, input_boxes=inputs["input_boxes"].to(self.device),
                               multimask_output=False)
            full = self.processor.image_processor.post_process_masks(
                outputs.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][:, 0].numpy()
            # The whole frame as the "crop": sdk_rle gets the full mask back with one copy.
            masks = tuple(CompactMask(image.height, image.width, 0, 0, mask) for mask in full)
        result = ImageResult(width=image.width, height=image.height, detections=detections, masks=masks)
        return build_prediction(result, config, model_version, encode_mask=sdk_rle)[0]
