"""Grounding DINO and MM-Grounding-DINO: text phrases → boxes, in the pixel frame of the
EXIF-transposed image.

Against transformers' ``GroundingDinoProcessor.post_process_grounded_object_detection`` on the
same model outputs (tests/test_detector_reference.py), boxes and scores are equal for a single
phrase with NMS off, equal box/text thresholds and no cap, wherever a box's best token is one of
the phrase's. The differences are by design:

- a box's score is the best probability among its phrase's tokens (the reference takes all the
  prompt's tokens, [CLS], '.' and [SEP] included, which can make a box score high for no phrase);
- its label is the one whole prompt phrase that scores highest (the reference decodes whichever
  tokens pass ``text_threshold``: part of a phrase, or pieces of two);
- the prompt is the phrases joined by " . ", with a '.' or '?' inside a phrase (a label "st. bernard")
  spaced out: both end a phrase inside the model (its text self-attention blocks), so each phrase
  stays one block and one span of tokens (the reference takes the text as given);
- boxes are clipped to the image, slivers under a pixel dropped, NMS runs per phrase, and at most
  ``max_detections`` are kept (the reference does none of these).

Thresholds (box, text, NMS, max detections) are per image: the detector is built with the
deployment's (:class:`DetectThresholds` from the env) and ``detect`` takes others per image, so one
batch can hold images of requests with different options. They apply after the forward pass only,
so an image's boxes do not depend on what it was batched with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, GroundingDinoForObjectDetection, MMGroundingDinoForObjectDetection
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

from backend.batching import chunks
from backend.engine.compiling import batch_bucket, compile_blocks, pad_rows
from backend.engine.msda import install_fused_msda
from backend.engine.preprocess import Canvas, Normalizer, to_canvas, to_device
from backend.engine.transfer import HostCopy
from backend.results import Detections
from backend.settings import DetectThresholds


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


@dataclass(frozen=True)
class DinoInput:
    """One image ready for DINO: resized as the processor does, uint8 in its orientation's canvas
    (normalized on the device), and the (H, W) of the original image."""

    canvas: Canvas
    size: tuple[int, int]


#: model_type → the class that runs it. MM-Grounding-DINO (mm_grounding_dino_*, LLMDet) is Grounding
#: DINO's architecture retrained (a learnt bias and a 1/sqrt(d) scale in its text-query similarity);
#: everything around the model is the same: the BERT tokenizer with the same special ids ([CLS] 101,
#: [SEP] 102, '.' 1012, '?' 1029 split the prompt's phrases inside both models), the
#: GroundingDinoImageProcessor, logits of (B, Q, max_text_len) with -inf past the prompt, and
#: transformers' one GroundingDinoProcessor for both. So only the model class differs here.
MODEL_CLASSES = {"grounding-dino": GroundingDinoForObjectDetection,
                 "mm-grounding-dino": MMGroundingDinoForObjectDetection}


def separator_ids(model, tokenizer) -> frozenset[int]:
    """The token ids that split the prompt into phrases inside ``model``: its ``special_tokens``
    buffer (transformers' ``SPECIAL_TOKENS``: [CLS], [SEP], '.', '?'), which
    ``generate_masks_with_special_tokens_and_transfer_map`` turns into the text self-attention
    blocks; the tokenizer's ids of the same four where a model has no such buffer."""
    buffer = getattr(getattr(model, "model", model), "special_tokens", None)
    if buffer is not None:
        return frozenset(int(t) for t in buffer.tolist())
    ids = tokenizer.convert_tokens_to_ids([tokenizer.cls_token, tokenizer.sep_token, ".", "?"])
    return frozenset(int(t) for t in ids)


def model_class(source: str):
    """The model class for the checkpoint ``source`` (hub id or directory), by its config's model_type."""
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{source} is a {model_type!r} checkpoint: the detector takes "
                         f"{' or '.join(map(repr, MODEL_CLASSES))} (a Grounding DINO or MM-Grounding-DINO checkpoint)")
    return MODEL_CLASSES[model_type]


class GroundingDinoDetector:
    """Text prompt → boxes with Grounding DINO or MM-Grounding-DINO (transformers implementations,
    chosen by the checkpoint's model_type: :data:`MODEL_CLASSES`).

    ``prepare(image)`` is the CPU half (resize, normalize, pad; thread-safe, run it ahead of the
    GPU); ``detect(inputs, phrases)`` runs the model on batches of prepared images and returns one
    :class:`Detections` per image. Each box is grounded to the phrase whose tokens score highest
    for it, so a detection always names one of the prompt phrases.

    Batching is exact: every image is padded to a canvas that depends only on its orientation, so
    an image gets the same boxes alone or in a batch.

    The keyword thresholds are the defaults (``self.thresholds``) for images ``detect`` gets no
    :class:`DetectThresholds` for.
    """

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, *, box_threshold: float,
                 text_threshold: float, nms_threshold: float, max_detections: int, batch_size: int,
                 compile: bool = False):
        self.device, self.dtype = device, dtype
        self.thresholds = DetectThresholds(box_threshold, text_threshold, nms_threshold, max_detections)
        self.batch_size = batch_size
        cls = model_class(source)  # first: a checkpoint of another family fails with what to fix
        self.image_processor = GroundingDinoImageProcessorPil.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        # Its multi-scale deformable attention has no SDPA form; the text/image attentions are eager.
        self.model = cls.from_pretrained(source, dtype=dtype).to(device).eval()
        # its deformable attention as our fused Triton kernel (CUDA with triton only; 0 layers elsewhere)
        self.fused_msda_layers = install_fused_msda(self.model)
        self.compiled = compile
        if compile:
            # The Swin backbone is most of DINO's arithmetic and sees only the two canvas shapes: its
            # layers are compiled. The rest (deformable attention, text fusion, .item() calls) breaks
            # graphs and takes minutes to compile for a few percent, so it stays eager.
            compile_blocks(self.model.model.backbone.conv_encoder.model, "grounding-dino backbone")
        self.max_text_len = self.model.config.max_text_len
        self.separator_ids = separator_ids(self.model, self.tokenizer)
        # The separators' text ('.', '?'): inside one phrase (a label "st. bernard") it would split
        # the phrase in two for the model, so the prompt carries a space there instead.
        texts = [t for t in self.tokenizer.convert_ids_to_tokens(list(self.separator_ids))
                 if t not in self.tokenizer.all_special_tokens]
        self._inner_separators = re.compile("|".join(map(re.escape, texts))) if texts else None
        size = self.image_processor.size
        self.short_edge, self.long_edge = size["shortest_edge"], size["longest_edge"]
        self.normalize = Normalizer(self.image_processor)

    def canvas_for(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) every image of this orientation is padded to, alone or batched."""
        if height <= width:
            return self.short_edge, self.long_edge
        return self.long_edge, self.short_edge

    def prepare(self, image: Image.Image) -> DinoInput:
        resized = get_size_with_aspect_ratio((image.height, image.width), self.short_edge, self.long_edge)
        canvas = to_canvas(image, resized, self.canvas_for(image.width, image.height), self.image_processor.resample,
                           device=self.device)
        return DinoInput(canvas, (image.height, image.width))

    def detect(self, inputs: Sequence[DinoInput | Image.Image], phrases: Sequence[Sequence[str]],
               thresholds: Sequence[DetectThresholds | None] | None = None) -> list[Detections]:
        """Per image its detections: (N, 4) XYXY float32 pixels of that image, scores, phrases.

        ``thresholds``: one per image (None, or a None item: :attr:`thresholds`, the deployment's)."""
        return self.launch(inputs, phrases, thresholds).result()

    @torch.inference_mode()
    def launch(self, inputs: Sequence[DinoInput | Image.Image], phrases: Sequence[Sequence[str]],
               thresholds: Sequence[DetectThresholds | None] | None = None) -> "PendingDetections":
        """:meth:`detect` without the wait: the forwards are queued and their outputs' copies to the
        host issued; the caller may queue more device work (SAM's encoder) before it calls
        :meth:`PendingDetections.result`, which waits once and post-processes on the host."""
        if len(inputs) != len(phrases):
            raise ValueError(f"got {len(inputs)} images but {len(phrases)} phrase lists: pass one per image")
        if thresholds is not None and len(thresholds) != len(inputs):
            raise ValueError(f"got {len(inputs)} images but {len(thresholds)} thresholds: pass one per image")
        limits = [self.thresholds if t is None else t for t in (thresholds or [None] * len(inputs))]
        prepared = [item if isinstance(item, DinoInput) else self.prepare(item) for item in inputs]
        by_canvas: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(prepared):
            if phrases[index]:
                by_canvas.setdefault(item.canvas.shape, []).append(index)
        batches = []
        for indices in by_canvas.values():
            for chunk in chunks(indices, self.batch_size):
                batches.append((chunk, self._launch([prepared[i] for i in chunk], [phrases[i] for i in chunk])))
        return PendingDetections(self, len(prepared), [i.size for i in prepared], list(phrases), limits, batches)

    def _launch(self, items: list[DinoInput], phrases: list[Sequence[str]]) -> tuple[HostCopy, np.ndarray]:
        """Queue one forward; → the copy of its (B, Q, T) token probabilities and (B, Q, 4) cxcywh
        boxes (T: the batch's prompt tokens, not the model's 256), and the (B, T) input ids."""
        prompts = [self.prompt_for(p) for p in phrases]
        text = self.tokenizer(prompts, return_tensors="pt", padding="longest", truncation=True,
                              max_length=self.max_text_len)
        text = {k: v for k, v in text.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        canvases = [i.canvas for i in items]
        if self.compiled:  # round the batch up to a bucket so the compiled backbone is reused
            rows = batch_bucket(len(items), self.batch_size)
            text = {k: pad_rows(v, rows) for k, v in text.items()}
            canvases += [canvases[-1]] * (rows - len(canvases))
        model_inputs = {k: to_device(v, self.device) for k, v in text.items()}
        pixels, valid = self.normalize(canvases, self.device, self.dtype)
        outputs = self.model(**model_inputs, pixel_values=pixels, pixel_mask=valid.long())
        count, tokens = len(items), text["input_ids"].shape[1]
        # Only the prompt's tokens can score (the logits are -inf past them): ~10x less to copy.
        probs = outputs.logits[:count, :, :tokens].float().sigmoid()  # (B, Q, T)
        boxes = outputs.pred_boxes[:count].float()  # (B, Q, 4) cxcywh in [0, 1] of the unpadded image
        return HostCopy([probs, boxes]), text["input_ids"][:count].numpy()

    def prompt_for(self, phrases: Sequence[str]) -> str:
        """The text DINO gets: the phrases joined by ' . ', a separator inside a phrase spaced out,
        so the model sees exactly one phrase between two separators for each of ``phrases``."""
        if self._inner_separators is not None:
            phrases = [self._inner_separators.sub(" ", p) for p in phrases]
        return " . ".join(phrases) + " ."

    def _phrase_spans(self, input_ids: np.ndarray, count: int) -> list[tuple[int, int]]:
        """Token [start, end) of each phrase: the runs between the model's separators ([CLS], '.',
        '?', [SEP]: :attr:`separator_ids`), the blocks its text self-attention is restricted to."""
        spans, start = [], 1
        for position, token in enumerate(input_ids[1:], start=1):
            if token in self.separator_ids:
                # An empty span (a phrase that tokenized to nothing) is kept so later phrases stay aligned.
                spans.append((start, position))
                start = position + 1
                if token == self.tokenizer.sep_token_id:
                    break
        return spans[:count]  # a truncated prompt loses its last phrases, never shifts them

    def _postprocess(self, probs, cxcywh, input_ids, phrases, size: tuple[int, int],
                     limits: DetectThresholds) -> Detections:
        spans = self._phrase_spans(input_ids, len(phrases))
        if not spans:
            return Detections.empty()
        per_phrase = np.stack([probs[:, s:e].max(axis=1) if e > s else np.zeros(len(probs), probs.dtype)
                               for s, e in spans], axis=1)  # (Q, P)
        phrase_index = per_phrase.argmax(axis=1)
        scores = per_phrase.max(axis=1)
        height, width = size
        cx, cy, w, h = cxcywh.T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * [width, height, width, height]
        xyxy = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
        keep = (scores > limits.box) & (scores >= limits.text)
        keep &= (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
        candidates = np.flatnonzero(keep)
        if len(candidates) == 0:
            return Detections.empty()
        # Per-phrase NMS in one call: shift each phrase's boxes far apart so they never overlap.
        offsets = phrase_index[candidates, None] * (max(width, height) + 1)
        kept = candidates[nms(xyxy[candidates] + offsets, scores[candidates], limits.nms)]
        kept = kept[: limits.max_detections]
        return Detections(boxes=xyxy[kept], scores=scores[kept].astype(np.float32),
                          phrases=tuple(phrases[i] for i in phrase_index[kept]))


class PendingDetections:
    """Detections whose forwards are queued on the device (:meth:`GroundingDinoDetector.launch`)."""

    def __init__(self, detector: GroundingDinoDetector, count: int, sizes: list[tuple[int, int]],
                 phrases: list[Sequence[str]], limits: list[DetectThresholds],
                 batches: list[tuple[list[int], tuple[HostCopy, np.ndarray]]]):
        self._detector, self._count, self._sizes = detector, count, sizes
        self._phrases, self._limits, self._batches = phrases, limits, batches

    def result(self) -> list[Detections]:
        """Per image its detections (an image without phrases: none); waits once per forward."""
        results = [Detections.empty()] * self._count
        for chunk, (copy, input_ids) in self._batches:
            probs, boxes = copy.result()
            for row, index in enumerate(chunk):
                results[index] = self._detector._postprocess(probs[row], boxes[row], input_ids[row], self._phrases[index],
                                                             self._sizes[index], self._limits[index])
        return results
