"""SAM: boxes or clicks → masks, in the pixel frame of the EXIF-transposed image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from backend.batching import chunks
from backend.engine.embedcache import EmbeddingCache
from backend.engine.compiling import batch_bucket, compile_blocks
from backend.engine.relpos import install_relpos_attention
from backend.engine.preprocess import Canvas, Normalizer, to_canvas, to_device
from backend.engine.masks import DEFAULT_BUDGET_BYTES, MaskJob, PendingMasks, upsample_batch
from backend.results import CompactMask, MaskPrompt


@dataclass(frozen=True)
class SamInput:
    """One image ready for SAM's encoder: resized as the processor does, uint8 in SAM's (S, S)
    square (normalized on the device); original_size (H, W) of the image."""

    canvas: Canvas
    original_size: tuple[int, int]

    @property
    def reshaped_size(self) -> tuple[int, int]:
        """(h, w) of the resized image inside the square."""
        return self.canvas.resized


@dataclass(frozen=True)
class ImageEmbedding:
    """The image encoder's output for one image, on the model's device: ``tensors``, each with a
    batch dimension of 1 (SAM: the (1, C, h, w) embedding; SAM-HQ and SAM 2 add the features their
    decoders also read, see their ``_encode_pixels``), plus the sizes (H, W) of the original image
    and of its resized copy inside the model's input square."""

    tensors: tuple[torch.Tensor, ...]
    original_size: tuple[int, int]
    reshaped_size: tuple[int, int]

    @property
    def embeddings(self) -> torch.Tensor:
        """The first tensor (SAM and SAM-HQ: the image embedding)."""
        return self.tensors[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class SamSegmenter:
    """Boxes or clicks → masks with SAM (transformers implementation).

    ``prepare(image)`` is the CPU half (resize, normalize, pad; thread-safe). ``segment(inputs,
    boxes)`` takes prepared images (or PIL images) and per image an ``(N, 4)`` XYXY pixel array; it
    returns per image N :class:`CompactMask`. The encoder runs once per image batch, the decoder once
    per batch for all its boxes, and the masks are upsampled on the device. With ``keys`` (content
    hashes) embeddings go through ``cache``, so a later click on the image skips the encoder.
    ``refine(image, key, prompts)`` runs the decoder on click/box prompts (see :class:`MaskPrompt`).

    Other SAM families subclass it and override the hooks: ``model_class``, ``_load_processor``,
    ``_resized_shape``, ``_encode_pixels``, ``_decoder_inputs``, ``_to_sam_frame`` and ``_mask_job``.

    The host waits for the device once per batch (``segment``) or per call (``refine``): masks and
    scores come back together in one :class:`~backend.engine.masks.PendingMasks`.
    """

    model_class = SamModel

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, *, batch_size: int,
                 cache: EmbeddingCache | None = None, compile: bool = False, attention: str = "sdpa",
                 mask_budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._load_processor(source)
        self.model = self.model_class.from_pretrained(source, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.cache = cache if cache is not None else EmbeddingCache(0)
        self.compiled = compile
        # SAM_ATTENTION: SAM / SAM-HQ's rel-pos attention without a dense bias (flex); before compiling
        self.relpos_layers = install_relpos_attention(self.model.vision_encoder, attention)
        if compile:  # its ViT layers (SAM 2: Hiera blocks), see backend.engine.compiling
            compile_blocks(self.model.vision_encoder, f"{self.model.config.model_type} image encoder")
        self.mask_budget_bytes = mask_budget_bytes

    def _load_processor(self, source: str) -> None:
        """Sets ``square`` (side of the model's input), ``resample`` and ``normalize``."""
        self.image_processor = SamImageProcessorPil.from_pretrained(source)
        self.processor = SamProcessor(image_processor=self.image_processor)
        self.square = self.image_processor.pad_size["height"]
        self.resample = self.image_processor.resample
        self.normalize = Normalizer(self.image_processor)

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        # The processor's own resize rule (pinned transformers: a private helper).
        return self.image_processor._get_preprocess_shape((height, width), self.image_processor.size["longest_edge"])

    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, S, S) normalized pixels → the tensors :class:`ImageEmbedding` holds, batched."""
        return (self.model.get_image_embeddings(pixels),)

    def _decoder_inputs(self, tensors: Sequence[torch.Tensor]) -> dict:
        """The model's keyword arguments for batched embedding ``tensors``."""
        return {"image_embeddings": tensors[0]}

    def _batched(self, embeddings: Sequence[ImageEmbedding]) -> dict:
        return self._decoder_inputs([torch.cat(level) for level in zip(*(e.tensors for e in embeddings))])

    def prepare(self, image: Image.Image) -> SamInput:
        resized = self._resized_shape(image.height, image.width)
        canvas = to_canvas(image, resized, (self.square, self.square), self.resample, device=self.device)
        return SamInput(canvas, (image.height, image.width))

    def _prepared(self, items: Sequence[SamInput | Image.Image | Callable[[], Image.Image]]) -> list[SamInput]:
        """Items as SAM inputs; a callable (a deferred image's ``pixels``) is called only here, so an
        image whose embedding is cached is never decoded."""
        return [item if isinstance(item, SamInput) else self.prepare(item() if callable(item) else item)
                for item in items]

    def has_embedding(self, key: str | None) -> bool:
        """Whether ``key``'s embedding is cached now (no hit or miss counted)."""
        return key is not None and key in self.cache

    @torch.inference_mode()
    def embed(self, inputs: Sequence[SamInput | Image.Image], keys: Sequence[str | None] | None = None) -> list[ImageEmbedding]:
        """One embedding per image; cached ones come from the cache, the rest in one encoder batch."""
        keys = list(keys) if keys is not None else [None] * len(inputs)
        found: dict[int, ImageEmbedding] = {}
        missing = []
        for i, key in enumerate(keys):
            cached = self.cache.get(key) if key is not None else None
            if cached is not None:
                found[i] = cached
            else:
                missing.append(i)
        if missing:
            prepared = self._prepared([inputs[i] for i in missing])
            canvases = [p.canvas for p in prepared]
            if self.compiled:  # round the batch up to a bucket so the compiled encoder is reused
                canvases += [canvases[-1]] * (batch_bucket(len(canvases), self.batch_size) - len(canvases))
            encoded = self._encode_pixels(self.normalize(canvases, self.device, self.dtype)[0])
            for row, (i, item) in enumerate(zip(missing, prepared)):
                # A cached row view would keep the whole batch's embeddings alive: copy it out.
                rows = tuple(t[row:row + 1].clone() if keys[i] is not None else t[row:row + 1] for t in encoded)
                embedding = ImageEmbedding(rows, item.original_size, item.reshaped_size)
                if keys[i] is not None:
                    self.cache.put(keys[i], embedding)
                found[i] = embedding
        return [found[i] for i in range(len(inputs))]

    @torch.inference_mode()
    def segment(self, inputs: Sequence[SamInput | Image.Image], boxes: Sequence[np.ndarray],
                keys: Sequence[str | None] | None = None,
                embeddings: Sequence[ImageEmbedding | None] | None = None) -> list[list[CompactMask]]:
        """Per image, one mask per row of its (N, 4) XYXY pixel ``boxes``.

        ``embeddings``: per image one already computed by :meth:`embed` (or None), e.g. encoded
        while the host was busy with the detector's output; the others are encoded here."""
        if len(inputs) != len(boxes):
            raise ValueError(f"got {len(inputs)} images but {len(boxes)} box arrays: pass one per image")
        if embeddings is not None and len(embeddings) != len(inputs):
            raise ValueError(f"got {len(inputs)} images but {len(embeddings)} embeddings: pass one (or None) per image")
        results: list[list[CompactMask]] = [[] for _ in inputs]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        pending: list[tuple[list[int], PendingMasks]] = []
        for chunk in chunks(todo, self.batch_size):
            given = {i: embeddings[i] for i in chunk if embeddings is not None and embeddings[i] is not None}
            missing = [i for i in chunk if i not in given]
            if missing:
                encoded = self.embed([inputs[i] for i in missing], [keys[i] for i in missing] if keys else None)
                given.update(zip(missing, encoded))
            pending.append((chunk, self._decode_boxes([given[i] for i in chunk], [boxes[i] for i in chunk])))
        for chunk, masks in pending:  # the copies of every chunk were issued: one wait each, in order
            for index, image_masks in zip(chunk, masks.result()[0]):
                results[index] = image_masks
        return results

    def _to_sam_frame(self, coords: np.ndarray, embedding: ImageEmbedding, is_box: bool) -> np.ndarray:
        # The processor's own transform (pinned transformers: it needs images to run its public path).
        return self.processor._normalize_coordinates(self.processor.target_size, coords, embedding.original_size,
                                                     is_bounding_box=is_box)

    def _mask_job(self, logits: torch.Tensor, embedding: ImageEmbedding) -> MaskJob:
        """How (N, h, w) decoder logits of ``embedding``'s image become its masks: SAM's padded square."""
        return MaskJob(logits, self.square, embedding.reshaped_size, embedding.original_size)

    def _decode_boxes(self, embeddings: list[ImageEmbedding], boxes: list[np.ndarray]) -> PendingMasks:
        # The decoder takes the same box count per image: pad with copies of the first box and
        # drop their masks afterwards (each box is decoded independently, so padding is inert).
        most = max(len(b) for b in boxes)
        padded = np.stack([self._to_sam_frame(np.concatenate([b, np.repeat(b[:1], most - len(b), axis=0)]), e, True)
                           for b, e in zip(boxes, embeddings)])
        outputs = self.model(**self._batched(embeddings), multimask_output=False,
                             input_boxes=to_device(torch.from_numpy(padded), self.device, self.dtype))
        # pred_masks: (B, most, 1, h, w) logits; all images' masks are upsampled and copied together
        return upsample_batch([self._mask_job(outputs.pred_masks[b, : len(image_boxes), 0], embeddings[b])
                               for b, image_boxes in enumerate(boxes)], budget_bytes=self.mask_budget_bytes)

    @torch.inference_mode()
    def refine(self, image: SamInput | Image.Image, key: str | None,
               prompts: Sequence[MaskPrompt]) -> list[tuple[CompactMask, float]]:
        """Per prompt the best of SAM's three candidate masks by predicted IoU: (mask, IoU)."""
        if not prompts:
            return []
        embedding = self.embed([image], [key])[0]
        best_logits, best_scores = [], []
        for prompt in prompts:
            kwargs = {}
            if len(prompt.points):
                points = self._to_sam_frame(np.asarray(prompt.points, np.float64), embedding, False)
                kwargs["input_points"] = to_device(torch.from_numpy(points[None, None]), self.device, self.dtype)
                kwargs["input_labels"] = to_device(torch.from_numpy(np.asarray(prompt.point_labels, np.int64)[None, None]),
                                                   self.device)
            if prompt.box is not None:
                box = self._to_sam_frame(np.asarray(prompt.box, np.float64)[None], embedding, True)
                kwargs["input_boxes"] = to_device(torch.from_numpy(box[None]), self.device, self.dtype)
            outputs = self.model(**self._decoder_inputs(embedding.tensors), multimask_output=True, **kwargs)
            scores = outputs.iou_scores[0, 0].float()  # (3,)
            best = scores.argmax().reshape(1)  # stays on the device: no wait per prompt
            best_logits.append(outputs.pred_masks[0, 0].index_select(0, best))  # (1, h, w)
            best_scores.append(scores.index_select(0, best))
        pending = upsample_batch([self._mask_job(torch.cat(best_logits), embedding)],
                                 budget_bytes=self.mask_budget_bytes, extras=[torch.cat(best_scores)])
        (masks,), (scores,) = pending.result()
        return [(mask, float(score)) for mask, score in zip(masks, scores)]
