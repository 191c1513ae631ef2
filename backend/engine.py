"""The GPU stage: Grounding DINO turns phrases into boxes, SAM turns boxes into masks.

All coordinates that enter or leave this module are in the pixel frame of the EXIF-transposed
image (the image Label Studio displays): boxes are ``(N, 4)`` float32 XYXY pixels, masks are
``(N, H, W)`` bool at the image's full size. Model-specific frames (DINO's normalized cxcywh,
SAM's 1024-pixel padded square) never leave the engine.

Batching is exact: every image is padded to a canvas that depends only on its own orientation
(DINO) or is always the same square (SAM), so an image gets the same result alone or in a batch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    SamModel,
    SamProcessor,
)
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from backend.embedcache import EmbeddingCache
from backend.results import Detections, ImageResult, MaskPrompt

log = logging.getLogger(__name__)

# Masks are upsampled to full image size in chunks of this many boxes, which bounds the float
# buffer to MASK_CHUNK x H x W (about 130 MB at 1080p) instead of N x H x W.
MASK_CHUNK = 16


class Detector(Protocol):
    def detect(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]]) -> list[Detections]: ...


class Segmenter(Protocol):
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray],
                keys: Sequence[str | None] | None = None) -> list[np.ndarray]: ...


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression. boxes (N, 4) XYXY, scores (N,) → kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes[order].T
    areas = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    inter_w = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    inter_h = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = inter_w * inter_h
    iou = inter / np.maximum(areas[:, None] + areas[None] - inter, 1e-9)
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > iou_threshold
    return order[np.array(keep, dtype=np.int64)]


class GroundingDinoDetector:
    """Text prompt → boxes with Grounding DINO (transformers implementation).

    ``detect(images, phrases)`` takes RGB images and, per image, the prompt phrases; it returns one
    :class:`Detections` per image. Each box is grounded to the phrase whose tokens score highest
    for it, so a detection always names one of the prompt phrases.
    """

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, *, box_threshold: float,
                 text_threshold: float, nms_threshold: float, max_detections: int, batch_size: int):
        self.device, self.dtype = device, dtype
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.nms_threshold, self.max_detections, self.batch_size = nms_threshold, max_detections, batch_size
        image_processor = GroundingDinoImageProcessorPil.from_pretrained(source)
        self.processor = GroundingDinoProcessor(image_processor=image_processor,
                                                tokenizer=AutoTokenizer.from_pretrained(source))
        self.model = GroundingDinoForObjectDetection.from_pretrained(source, dtype=dtype).to(device).eval()
        self.max_text_len = self.model.config.max_text_len
        self.dot_id = self.processor.tokenizer.convert_tokens_to_ids(".")
        size = image_processor.size
        self.short_edge, self.long_edge = size["shortest_edge"], size["longest_edge"]

    def _canvas(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) every image of this orientation is padded to, alone or batched."""
        if image.height <= image.width:
            return self.short_edge, self.long_edge
        return self.long_edge, self.short_edge

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]]) -> list[Detections]:
        if len(images) != len(phrases):
            raise ValueError(f"got {len(images)} images but {len(phrases)} phrase lists: pass one per image")
        results: list[Detections | None] = [None] * len(images)
        by_canvas: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            if phrases[index]:
                by_canvas.setdefault(self._canvas(image), []).append(index)
            else:
                results[index] = Detections.empty()
        for canvas, indices in by_canvas.items():
            for chunk in _chunks(indices, self.batch_size):
                batch = self._forward([images[i] for i in chunk], [phrases[i] for i in chunk], canvas)
                for index, detections in zip(chunk, batch):
                    results[index] = detections
        return results  # type: ignore[return-value]

    def _forward(self, images, phrases, canvas) -> list[Detections]:
        prompts = [" . ".join(p) + " ." for p in phrases]
        inputs = self.processor(images=list(images), text=prompts, return_tensors="pt", padding="longest",
                                truncation=True, max_length=self.max_text_len,
                                pad_size={"height": canvas[0], "width": canvas[1]})
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        probs = outputs.logits.float().sigmoid().cpu().numpy()  # (B, Q, max_text_len)
        boxes = outputs.pred_boxes.float().cpu().numpy()  # (B, Q, 4) cxcywh in [0, 1] of the unpadded image
        input_ids = inputs["input_ids"].cpu().numpy()
        return [self._postprocess(probs[b], boxes[b], input_ids[b], phrases[b], images[b])
                for b in range(len(images))]

    def _phrase_spans(self, input_ids: np.ndarray, count: int) -> list[tuple[int, int]]:
        """Token [start, end) of each phrase: the runs between [CLS], '.' separators and [SEP]."""
        spans, start = [], 1
        for position, token in enumerate(input_ids[1:], start=1):
            if token == self.dot_id or token == self.processor.tokenizer.sep_token_id:
                # An empty span (a phrase that tokenized to nothing) is kept so later phrases stay aligned.
                spans.append((start, position))
                start = position + 1
                if token != self.dot_id:
                    break
        return spans[:count]  # a truncated prompt loses its last phrases, never shifts them

    def _postprocess(self, probs, cxcywh, input_ids, phrases, image) -> Detections:
        spans = self._phrase_spans(input_ids, len(phrases))
        if not spans:
            return Detections.empty()
        per_phrase = np.stack([probs[:, s:e].max(axis=1) if e > s else np.zeros(len(probs), probs.dtype)
                               for s, e in spans], axis=1)  # (Q, P)
        phrase_index = per_phrase.argmax(axis=1)
        scores = per_phrase.max(axis=1)
        width, height = image.width, image.height
        cx, cy, w, h = cxcywh.T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * [width, height, width, height]
        xyxy = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
        keep = (scores > self.box_threshold) & (scores >= self.text_threshold)
        keep &= (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
        candidates = np.flatnonzero(keep)
        if len(candidates) == 0:
            return Detections.empty()
        # Per-phrase NMS in one call: shift each phrase's boxes far apart so they never overlap.
        offsets = phrase_index[candidates, None] * (max(width, height) + 1)
        kept = candidates[nms(xyxy[candidates] + offsets, scores[candidates], self.nms_threshold)]
        kept = kept[: self.max_detections]
        return Detections(boxes=xyxy[kept], scores=scores[kept].astype(np.float32),
                          phrases=tuple(phrases[i] for i in phrase_index[kept]))


@dataclass(frozen=True)
class ImageEmbedding:
    """SAM's image embedding of one image: (1, C, h, w) on the model's device, plus the sizes
    (H, W) of the original image and of its resized copy inside SAM's padded square."""

    embeddings: torch.Tensor
    original_size: tuple[int, int]
    reshaped_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


class SamSegmenter:
    """Boxes or clicks → masks with SAM (transformers implementation).

    ``segment(images, boxes)`` takes RGB images and per image an ``(N, 4)`` XYXY pixel array; it
    returns per image an ``(N, H, W)`` bool array. The image encoder runs once per image (batched
    across images) and the mask decoder once per image batch for all its boxes. With ``keys``
    (content hashes) embeddings go through ``cache``, so a later click on the image skips the encoder.
    ``refine(image, key, prompts)`` runs the decoder on click/box prompts (see :class:`MaskPrompt`).
    """

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, *, batch_size: int,
                 cache: EmbeddingCache | None = None):
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.processor = SamProcessor(image_processor=SamImageProcessorPil.from_pretrained(source))
        self.model = SamModel.from_pretrained(source, dtype=dtype).to(device).eval()
        self.cache = cache if cache is not None else EmbeddingCache(0)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image], keys: Sequence[str | None] | None = None) -> list[ImageEmbedding]:
        """One embedding per image; cached ones come from the cache, the rest in one encoder batch."""
        keys = list(keys) if keys is not None else [None] * len(images)
        found: dict[int, ImageEmbedding] = {}
        missing = []
        for i, key in enumerate(keys):
            cached = self.cache.get(key) if key is not None else None
            if cached is not None:
                found[i] = cached
            else:
                missing.append(i)
        if missing:
            inputs = self.processor(images=[images[i] for i in missing], return_tensors="pt")
            encoded = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))
            for row, i in enumerate(missing):
                embedding = ImageEmbedding(encoded[row:row + 1], tuple(inputs["original_sizes"][row].tolist()),
                                           tuple(inputs["reshaped_input_sizes"][row].tolist()))
                found[i] = embedding
                if keys[i] is not None:
                    self.cache.put(keys[i], embedding)
        return [found[i] for i in range(len(images))]

    @torch.inference_mode()
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray],
                keys: Sequence[str | None] | None = None) -> list[np.ndarray]:
        if len(images) != len(boxes):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box arrays: pass one per image")
        results = [np.zeros((0, image.height, image.width), bool) for image in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        for chunk in _chunks(todo, self.batch_size):
            embeddings = self.embed([images[i] for i in chunk], [keys[i] for i in chunk] if keys else None)
            for index, masks in zip(chunk, self._decode_boxes(embeddings, [boxes[i] for i in chunk])):
                results[index] = masks
        return results

    def _to_sam_frame(self, coords: np.ndarray, embedding: ImageEmbedding, is_box: bool) -> np.ndarray:
        # The processor's own transform (pinned transformers: it needs images to run its public path).
        return self.processor._normalize_coordinates(self.processor.target_size, coords, embedding.original_size,
                                                     is_bounding_box=is_box)

    def _masks(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> np.ndarray:
        """(N, 1, h, w) decoder logits → (N, H, W) bool at the original size, MASK_CHUNK at a time."""
        sizes = torch.tensor([embedding.original_size]), torch.tensor([embedding.reshaped_size])
        parts = [self.processor.image_processor.post_process_masks(
                     low_res[None, start:start + MASK_CHUNK].float().cpu(), *sizes)[0][:, 0].numpy()
                 for start in range(0, len(low_res), MASK_CHUNK)]
        return np.concatenate(parts)

    def _decode_boxes(self, embeddings: list[ImageEmbedding], boxes: list[np.ndarray]) -> list[np.ndarray]:
        # The decoder takes the same box count per image: pad with copies of the first box and
        # drop their masks afterwards (each box is decoded independently, so padding is inert).
        most = max(len(b) for b in boxes)
        padded = np.stack([self._to_sam_frame(np.concatenate([b, np.repeat(b[:1], most - len(b), axis=0)]), e, True)
                           for b, e in zip(boxes, embeddings)])
        outputs = self.model(image_embeddings=torch.cat([e.embeddings for e in embeddings]), multimask_output=False,
                             input_boxes=torch.from_numpy(padded).to(self.device, self.dtype))
        return [self._masks(outputs.pred_masks[b, : len(image_boxes)], embeddings[b])
                for b, image_boxes in enumerate(boxes)]

    @torch.inference_mode()
    def refine(self, image: Image.Image, key: str | None, prompts: Sequence[MaskPrompt]) -> list[tuple[np.ndarray, float]]:
        """Per prompt the best of SAM's three candidate masks by predicted IoU: ((H, W) bool, IoU)."""
        if not prompts:
            return []
        embedding = self.embed([image], [key])[0]
        results = []
        for prompt in prompts:
            kwargs = {}
            if len(prompt.points):
                points = self._to_sam_frame(np.asarray(prompt.points, np.float64), embedding, False)
                kwargs["input_points"] = torch.tensor(points[None, None], device=self.device, dtype=self.dtype)
                kwargs["input_labels"] = torch.tensor(np.asarray(prompt.point_labels)[None, None], device=self.device,
                                                      dtype=torch.long)
            if prompt.box is not None:
                box = self._to_sam_frame(np.asarray(prompt.box, np.float64)[None], embedding, True)
                kwargs["input_boxes"] = torch.tensor(box[None], device=self.device, dtype=self.dtype)
            outputs = self.model(image_embeddings=embedding.embeddings, multimask_output=True, **kwargs)
            scores = outputs.iou_scores[0, 0].float()  # (3,)
            best = int(scores.argmax())
            mask = self._masks(outputs.pred_masks[0, 0, best:best + 1, None], embedding)  # (1, 1, h, w) in
            results.append((mask[0], float(scores[best])))
        return results


class Engine:
    """Detector + segmenter behind one lock: request threads share the models, one batch at a time.

    ``run(images, phrases)`` → one :class:`ImageResult` per image, in the pixel frame of each image.
    """

    def __init__(self, detector: Detector, segmenter: Segmenter):
        self.detector, self.segmenter = detector, segmenter
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, metrics=None) -> "Engine":
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        batch_size = settings.batch_size or 8  # "auto" sizing from free memory is a GPU-path feature
        log.info("loading models on %s (%s): %s, %s", device, dtype, settings.grounding_dino_model,
                 settings.sam_model)
        detector = GroundingDinoDetector(
            settings.grounding_dino_model, device, dtype, box_threshold=settings.box_threshold,
            text_threshold=settings.text_threshold, nms_threshold=settings.nms_threshold,
            max_detections=settings.max_detections, batch_size=batch_size)
        cache = EmbeddingCache(int(settings.embedding_cache_mb * 2**20))
        if metrics is not None:
            cache = EmbeddingCache(cache.max_bytes, on_hit=metrics.embedding_cache_hits.inc,
                                   on_miss=metrics.embedding_cache_misses.inc, on_size=metrics.embedding_cache_bytes.set)
        segmenter = SamSegmenter(settings.sam_model, device, dtype, batch_size=batch_size, cache=cache)
        return cls(detector, segmenter)

    def run(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]],
            keys: Sequence[str] | None = None) -> list[ImageResult]:
        """Text → boxes → masks. With ``keys`` (content hashes) SAM embeddings are cached for clicks."""
        with self._lock:
            detections = self.detector.detect(images, phrases)
            masks = self.segmenter.segment(images, [d.boxes for d in detections], keys)
        return [ImageResult(width=image.width, height=image.height, detections=d, masks=m)
                for image, d, m in zip(images, detections, masks)]

    def detect(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]]) -> list[Detections]:
        with self._lock:
            return self.detector.detect(images, phrases)

    def refine(self, image: Image.Image, key: str | None, prompts: Sequence[MaskPrompt]) -> list[tuple[np.ndarray, float]]:
        """Clicks/boxes → masks on one image, reusing its cached SAM embedding when there is one."""
        with self._lock:
            return self.segmenter.refine(image, key, prompts)
