"""SAM 3's tracker on a cached backbone output (clicks and boxes → masks), and mask upsampling.

``Sam3TrackerModel.forward(pixel_values=...)`` runs the ViT backbone, the tracker's own FPN neck,
its level-0/1 projections (``conv_s0``/``conv_s1``) and adds its no-memory embedding to the
coarsest level, then decodes the prompts. Here the backbone output comes from the cache
(``Sam3Features`` of ``backend.engine.sam3``, computed by the detector's pass), the rest is run once
per call and the prompts are decoded through the model's own ``forward(image_embeddings=...)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backend.engine.masks import DEFAULT_BUDGET_BYTES, binary_to_masks, chunk_size
from backend.results import CompactMask, MaskPrompt

MASK_THRESHOLD = 0.5  # on mask probabilities, as Sam3ImageProcessor.post_process_instance_segmentation


def tracker_embeddings(tracker, hidden: torch.Tensor) -> list[torch.Tensor]:
    """(1, h*w, C) backbone output → the tracker's image embeddings, the list
    ``Sam3TrackerModel.get_image_embeddings`` returns: (1, C_i, H_i, W_i), finest first."""
    sizes = tracker.config.vision_config.backbone_feature_sizes
    grid_h, grid_w = sizes[-1]
    spatial = hidden.view(hidden.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)
    fpn, _positions = tracker.vision_encoder.neck(spatial)
    levels = list(fpn[: len(sizes)])  # the tracker decodes on the three finest levels
    levels[0] = tracker.mask_decoder.conv_s0(levels[0])
    levels[1] = tracker.mask_decoder.conv_s1(levels[1])
    levels[-1] = levels[-1] + tracker.no_memory_embedding.view(1, -1, 1, 1)
    return levels


def to_square(coords: np.ndarray, size: tuple[int, int], square: int) -> np.ndarray:
    """(..., 2) XY pixels of the (H, W) image → the (S, S) input frame, scaled per axis as
    ``Sam3TrackerProcessor._normalize_coordinates`` does (the image is stretched to the square)."""
    height, width = size
    return np.asarray(coords, np.float64) * np.array([square / width, square / height])


@torch.inference_mode()
def refine_with_tracker(tracker, hidden: torch.Tensor, size: tuple[int, int], prompts: Sequence[MaskPrompt], *,
                        square: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[tuple[CompactMask, float]]:
    """Per prompt (points and/or a box, pixels of the (H, W) = ``size`` image) the best of the
    tracker's 3 masks by predicted IoU: (mask, IoU). ``hidden``: the image's (1, h*w, C) backbone
    output; ``square``: side S of the model input."""
    device, dtype = hidden.device, hidden.dtype
    embeddings = tracker_embeddings(tracker, hidden)
    results = []
    for prompt in prompts:
        kwargs = {}
        points = np.asarray(prompt.points, np.float64).reshape(-1, 2)
        if len(points):
            labels = np.asarray(prompt.point_labels).reshape(-1)
            if len(labels) != len(points):
                raise ValueError(f"a prompt has {len(points)} points but {len(labels)} labels: pass one label per point")
            scaled = to_square(points, size, square)
            kwargs["input_points"] = torch.tensor(scaled[None, None], device=device, dtype=dtype)
            kwargs["input_labels"] = torch.tensor(labels[None, None], device=device, dtype=torch.long)
        if prompt.box is not None:
            box = to_square(np.asarray(prompt.box, np.float64).reshape(2, 2), size, square)
            kwargs["input_boxes"] = torch.tensor(box.reshape(1, 1, 4), device=device, dtype=dtype)
        if not kwargs:
            raise ValueError("a prompt has neither points nor a box: give at least one")
        outputs = tracker(image_embeddings=embeddings, multimask_output=True, **kwargs)
        scores = outputs.iou_scores[0, 0].float()  # (3,)
        best = int(scores.argmax())
        # Sam3Processor.post_process_masks: logits resized straight to the image, threshold 0.
        mask = upsample_probabilities(outputs.pred_masks[0, 0, best:best + 1], size, threshold=0.0,
                                      budget_bytes=budget_bytes)[0]
        results.append((mask, float(scores[best])))
    return results


def upsample_probabilities(probabilities: torch.Tensor, size: tuple[int, int], *, threshold: float = MASK_THRESHOLD,
                           budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[CompactMask]:
    """(N, h, w) mask probabilities (or logits, with ``threshold`` 0) of the square input → N compact
    (H, W) masks: one bilinear resize straight to the image, as SAM 3's processors do (the square
    holds the whole image, stretched, so there is no padding to crop). Runs on their device."""
    height, width = size
    step = chunk_size(height, width, probabilities.shape[-1], budget_bytes)
    masks: list[CompactMask] = []
    for start in range(0, probabilities.shape[0], step):
        chunk = F.interpolate(probabilities[start:start + step, None].float(), (height, width), mode="bilinear",
                              align_corners=False)
        masks.extend(binary_to_masks(chunk[:, 0] > threshold))
    return masks
