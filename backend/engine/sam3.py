"""SAM 3 alone (ENGINE=sam3): each phrase is a concept prompt → every instance of it, with masks.

One checkpoint (``facebook/sam3``, a ``sam3_video`` model) holds both halves, loaded from the same
directory or hub id:

- the detector, ``Sam3Model``: ViT backbone + FPN neck (the "vision features"), CLIP text
  encoder, DETR encoder/decoder, mask decoder. The vision features of an image are computed once
  (images batched) and reused for all its phrases: ``Sam3Model.forward(vision_embeds=...)`` runs
  only the prompt-dependent part, one row per (image, phrase) pair.
- the tracker, ``Sam3TrackerModel`` (SAM-2-style: clicks/boxes → 3 candidate masks + IoU). It cannot
  take the detector's features as they are: it has its own FPN neck (``tracker_neck``) and its
  own projections. What the two share is the ViT backbone, so the cache (``keys``) holds the
  backbone's output of an image (:class:`Sam3Features`); :meth:`Sam3Engine.refine` runs the
  tracker's neck on it (a few convolutions) instead of the backbone. The tracker's copy of the
  backbone is dropped at load for the detector's (the checkpoint has one set of backbone weights).

Frames: SAM 3 resizes every image to its (S, S) square without keeping the aspect ratio (S = 1008),
so boxes come out normalised to the image and points go in scaled per axis. Everything entering or
leaving is in pixels of the EXIF-transposed image.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, Sam3Model, Sam3TrackerModel
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from backend.batching import chunks
from backend.engine.compiling import batch_bucket, compile_blocks, pad_rows, use_compile_cache, warm_buckets
from backend.engine.detector import nms
from backend.engine.device import auto_batch_size, configure_device, resolve_device, resolve_dtype
from backend.engine.embedcache import EmbeddingCache, embedding_cache
from backend.engine.families import SAM3_FAMILIES, load_error, require_family
from backend.engine.masks import DEFAULT_BUDGET_BYTES
from backend.engine.preprocess import Canvas, Normalizer, to_canvas
from backend.engine.sam3_prompts import refine_with_tracker, upsample_probabilities
from backend.results import CompactMask, Detections, ImageResult, MaskPrompt
from backend.settings import DetectThresholds

__all__ = ["Sam3Engine", "Sam3Input", "Sam3Features"]

log = logging.getLogger(__name__)

# The tracker's weights sit under tracker_model.* in the checkpoint; transformers' own renaming of
# that prefix does not apply when Sam3TrackerModel loads a sam3_video checkpoint (5.23: the
# decoder would stay random), so the mapping is given explicitly. Backbone and neck are renamed
# by transformers (detector_model.vision_encoder.backbone.* and tracker_neck.*).
TRACKER_KEY_MAPPING = {r"^tracker_model\.(.+)": r"\1"}
_PROCESSOR_DEFAULTS = dict(  # Sam3ImageProcessor's class defaults, for keys a config leaves out
    size={"height": 1008, "width": 1008}, resample=PILImageResampling.BILINEAR, do_rescale=True,
    rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)


@dataclass(frozen=True)
class Sam3Input:
    """One image ready for SAM 3: resized to the (S, S) square (aspect not kept), uint8, normalised on
    the device; size (H, W) of the original image."""

    canvas: Canvas
    size: tuple[int, int]


@dataclass(frozen=True)
class Sam3Features:
    """What a click needs of an image: the ViT backbone's output (1, h*w, C) on the device, shared
    by detector and tracker, and the (H, W) of the original image."""

    hidden: torch.Tensor
    size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


def image_processor_config(source: str) -> SimpleNamespace:
    """The checkpoint's preprocessor_config.json over Sam3ImageProcessor's defaults (read without
    constructing the processor, which needs torchvision)."""
    config, _ = ImageProcessingMixin.get_image_processor_dict(source)
    values = {**_PROCESSOR_DEFAULTS, **{k: v for k, v in config.items() if k in _PROCESSOR_DEFAULTS}}
    size = values["size"]
    if size.get("height") != size.get("width"):
        raise ValueError(f"{source}: SAM 3 takes a square input, the processor config says size={size}")
    values["resample"] = PILImageResampling(values["resample"])
    return SimpleNamespace(**values)


class Sam3Engine:
    """Concept prompts → instances (``run``/``detect``) and clicks/boxes → masks (``refine``).

    The surface of :class:`backend.engine.engine.Engine`. Thresholds (:class:`DetectThresholds`),
    applied after the forward pass so an image's result does not depend on its batch:

    - ``box``: an instance is kept when its score, sigmoid(query logit) x sigmoid(presence logit)
      as in ``post_process_instance_segmentation``, is above it. ``text`` has no counterpart (SAM 3
      scores a whole phrase, not tokens) and is ignored.
    - ``nms``: box NMS across all phrases of the image: one object found by two phrases ("cat",
      "kitten") is one region, under the phrase that scored it higher. Within a phrase it acts as
      the detector's per-phrase NMS does (transformers' image post-processing applies none;
      SAM 3's video model applies a mask NMS per prompt).
    - ``max_detections``: the best instances of the image, over all phrases.
    """

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, *, thresholds: DetectThresholds,
                 batch_size: int, cache: EmbeddingCache | None = None, compile: bool = False,
                 mask_budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.device, self.dtype, self.thresholds = device, dtype, thresholds
        self._batch_size = batch_size
        self.processor = image_processor_config(source)
        self.square = int(self.processor.size["height"])
        self.normalize = Normalizer(self.processor)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = Sam3Model.from_pretrained(source, dtype=dtype).to(device).eval()
        self.tracker = self._load_tracker(source)
        self.text_length = self.model.config.text_config.max_position_embeddings
        self.cache = cache if cache is not None else EmbeddingCache(0)
        self.mask_budget_bytes = mask_budget_bytes
        self.compiled = compile
        self._lock = threading.Lock()
        # The backbone is most of SAM 3's arithmetic and only ever sees (B, 3, S, S): its ViT layers
        # are compiled (backend.engine.compiling); the tracker shares it but reads cached features.
        self._backbone = self.model.vision_encoder.backbone
        if compile:
            compile_blocks(self._backbone, "sam3 backbone")

    def _load_tracker(self, source: str) -> Sam3TrackerModel:
        tracker, info = Sam3TrackerModel.from_pretrained(source, dtype=self.dtype, key_mapping=TRACKER_KEY_MAPPING,
                                                         output_loading_info=True)
        missing = [k for k in info["missing_keys"] if not k.startswith("vision_encoder.backbone.")]
        if missing:
            raise ValueError(f"the checkpoint holds no tracker weights ({len(missing)} missing, e.g. {missing[0]}): "
                             "use a sam3_video checkpoint such as facebook/sam3")
        tracker.vision_encoder.backbone = self.model.vision_encoder.backbone  # one copy of the shared ViT
        return tracker.to(self.device).eval()

    @classmethod
    def from_settings(cls, settings, metrics=None) -> "Sam3Engine":
        """Load SAM3_MODEL. Raises ModelLoadError (naming SAM3_MODEL and the fix) when it cannot."""
        source = settings.sam3_model
        require_family("SAM3_MODEL", source, SAM3_FAMILIES)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        configure_device(device, settings.flush_denormals)
        log.info("loading SAM 3 on %s (%s%s): %s", device, dtype, ", compiled" if settings.compile else "", source)
        if settings.compile and settings.compile_cache_dir:
            use_compile_cache(settings.compile_cache_dir, device)
        try:
            engine = cls(source, device, dtype, thresholds=settings.detect_thresholds(),
                         batch_size=settings.batch_size or 1, cache=embedding_cache(settings, metrics),
                         compile=settings.compile)
        except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear state
            raise load_error("SAM3_MODEL", source, exc) from exc
        if settings.batch_size is None:
            engine.set_batch_size(auto_batch_size(device, engine.probe))
        if settings.compile:  # ready means compiled: no request waits for a compile
            warm_buckets(engine.probe, engine.batch_size, "sam3")
        return engine

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def set_batch_size(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def probe(self, batch_size: int) -> None:
        """``batch_size`` blank images with two phrases each: the peak memory of a real batch."""
        image = Image.new("RGB", (self.square, self.square))
        saved = self._batch_size
        self.set_batch_size(batch_size)
        try:
            self.run([self.prepare(image)] * batch_size, [["object", "thing"]] * batch_size)
        finally:
            self.set_batch_size(saved)

    # -- CPU half ---------------------------------------------------------------------------------

    def prepare(self, image: Image.Image) -> Sam3Input:
        """Resize to the (S, S) square as the processor does (thread-safe, no device work)."""
        canvas = to_canvas(image, (self.square, self.square), (self.square, self.square), self.processor.resample)
        return Sam3Input(canvas, (image.height, image.width))

    def _prepared(self, items: Sequence[Sam3Input | Image.Image]) -> list[Sam3Input]:
        return [item if isinstance(item, Sam3Input) else self.prepare(item) for item in items]

    def pixel_values(self, items: Sequence[Sam3Input | Image.Image]) -> torch.Tensor:
        """(B, 3, S, S) model input in the model's dtype on the device."""
        return self.normalize([p.canvas for p in self._prepared(items)], self.device, self.dtype)[0]

    def tokenize(self, phrases: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (P, L) on the device, padded as Sam3Processor does."""
        text = self.tokenizer(list(phrases), return_tensors="pt", padding="max_length", truncation=True,
                              max_length=self.text_length)
        return {k: text[k].to(self.device) for k in ("input_ids", "attention_mask")}

    # -- text → instances -------------------------------------------------------------------------

    def run(self, images: Sequence[Sam3Input | Image.Image], phrases: Sequence[Sequence[str]],
            keys: Sequence[str | None] | None = None,
            thresholds: Sequence[DetectThresholds | None] | None = None) -> list[ImageResult]:
        """Per image its instances of every phrase and their masks. With ``keys`` (content hashes)
        the backbone output is cached for :meth:`refine`. ``thresholds``: per image (None: the
        deployment's)."""
        if len(images) != len(phrases):
            raise ValueError(f"got {len(images)} images but {len(phrases)} phrase lists: pass one per image")
        for name, values in (("keys", keys), ("thresholds", thresholds)):
            if values is not None and len(values) != len(images):
                raise ValueError(f"got {len(images)} images but {len(values)} {name}: pass one per image")
        return self._run(images, phrases, keys, thresholds, with_masks=True)

    def detect(self, images: Sequence[Sam3Input | Image.Image], phrases: Sequence[Sequence[str]],
               thresholds: Sequence[DetectThresholds | None] | None = None) -> list[Detections]:
        """:meth:`run` without upsampling the masks: per image its detections."""
        if len(images) != len(phrases):
            raise ValueError(f"got {len(images)} images but {len(phrases)} phrase lists: pass one per image")
        return [result.detections for result in self._run(images, phrases, None, thresholds, with_masks=False)]

    def _run(self, images, phrases, keys, thresholds, *, with_masks: bool) -> list[ImageResult]:
        prepared = self._prepared(images)
        limits = [self.thresholds if t is None else t for t in (thresholds or [None] * len(images))]
        results = [ImageResult(p.size[1], p.size[0], Detections.empty(), ()) for p in prepared]
        todo = [i for i, image_phrases in enumerate(phrases) if image_phrases]  # no phrase: no model run
        with self._lock:
            for chunk in chunks(todo, self._batch_size):
                batch = self._run_chunk([prepared[i] for i in chunk], [phrases[i] for i in chunk],
                                        [keys[i] if keys else None for i in chunk], [limits[i] for i in chunk],
                                        with_masks)
                for index, result in zip(chunk, batch):
                    results[index] = result
        return results

    @torch.inference_mode()
    def _vision(self, pixels: torch.Tensor) -> Sam3VisionEncoderOutput:
        """``Sam3Model.get_vision_features`` with the backbone (whose layers may be compiled)."""
        count = pixels.shape[0]
        if self.compiled:  # round the batch up to a bucket so the compiled backbone is reused
            pixels = pad_rows(pixels, batch_bucket(count, self._batch_size))
        hidden = self._backbone(pixels).last_hidden_state[:count]  # (B, h*w, C)
        grid = self.square // self.model.config.vision_config.backbone_config.patch_size
        spatial = hidden.view(hidden.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
        fpn, positions = self.model.vision_encoder.neck(spatial)
        return Sam3VisionEncoderOutput(last_hidden_state=hidden, fpn_hidden_states=fpn, fpn_position_encoding=positions)

    @torch.inference_mode()
    def _run_chunk(self, items: list[Sam3Input], phrases: list[Sequence[str]], keys: list[str | None],
                   limits: list[DetectThresholds], with_masks: bool) -> list[ImageResult]:
        vision = self._vision(self.pixel_values(items))
        for row, (item, key) in enumerate(zip(items, keys)):
            if key is not None:  # a copy: a row view would keep the whole batch's features alive
                self.cache.put(key, Sam3Features(vision.last_hidden_state[row:row + 1].clone(), item.size))
        pairs = [(image, phrase) for image, image_phrases in enumerate(phrases) for phrase in image_phrases]
        found: list[list[tuple]] = [[] for _ in items]  # per image: (box, score, phrase, mask logits)
        if pairs:
            unique = list(dict.fromkeys(phrase for _, phrase in pairs))
            text = self.tokenize(unique)
            embeds = self.model.get_text_features(**text).pooler_output  # (U, L, D), once per phrase
            for rows in chunks(pairs, self._batch_size):
                image_rows = torch.tensor([image for image, _ in rows], device=self.device)
                text_rows = torch.tensor([unique.index(phrase) for _, phrase in rows], device=self.device)
                outputs = self.model(
                    vision_embeds=Sam3VisionEncoderOutput(
                        fpn_hidden_states=tuple(f[image_rows] for f in vision.fpn_hidden_states),
                        fpn_position_encoding=tuple(p[image_rows] for p in vision.fpn_position_encoding)),
                    text_embeds=BaseModelOutputWithPooling(pooler_output=embeds[text_rows]),
                    attention_mask=text["attention_mask"][text_rows])
                self._collect(outputs, rows, items, limits, found)
        return [self._result(item, instances, limit, with_masks)
                for item, instances, limit in zip(items, found, limits)]

    @staticmethod
    def _collect(outputs, rows: list[tuple[int, str]], items: list[Sam3Input], limits: list[DetectThresholds],
                 found: list[list[tuple]]) -> None:
        """Append to ``found[image]`` the queries of each (image, phrase) row scoring above the
        image's ``box`` threshold, at most its ``max_detections`` best per row (only those can be
        among the image's best after NMS unless NMS removes some of them; this bounds the mask
        logits held per image): (box, score, phrase, (h, w) mask logits). Boxes are XYXY pixels of
        the image, clipped to it. One device→host copy of scores and boxes per forward."""
        scores = (outputs.pred_logits.float().sigmoid() * outputs.presence_logits.float().sigmoid()).cpu()  # (R, Q)
        boxes = outputs.pred_boxes.float().cpu()  # (R, Q, 4) XYXY in [0, 1] of the image
        picked_rows, picked_queries, picked = [], [], []
        for row, (image, phrase) in enumerate(rows):
            height, width = items[image].size
            limit = limits[image]
            keep = torch.nonzero(scores[row] > limit.box).flatten()
            keep = keep[torch.argsort(scores[row, keep], descending=True, stable=True)][: limit.max_detections]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            pixels = torch.minimum(torch.clamp(boxes[row, keep] * scale, min=0), scale).numpy()
            for query, box, score in zip(keep.tolist(), pixels, scores[row, keep].tolist()):
                picked_rows.append(row)
                picked_queries.append(query)
                picked.append((image, box, score, phrase))
        if picked:
            device = outputs.pred_masks.device
            logits = outputs.pred_masks[torch.tensor(picked_rows, device=device),
                                        torch.tensor(picked_queries, device=device)]  # (K, h, w)
            for (image, box, score, phrase), mask in zip(picked, logits):
                found[image].append((box, score, phrase, mask))

    def _result(self, item: Sam3Input, instances: list[tuple], limits: DetectThresholds,
                with_masks: bool) -> ImageResult:
        height, width = item.size
        if not instances:
            return ImageResult(width, height, Detections.empty(), ())
        boxes = np.stack([i[0] for i in instances]).astype(np.float32)
        scores = np.array([i[1] for i in instances], np.float32)
        kept = nms(boxes, scores, limits.nms)[: limits.max_detections]
        detections = Detections(boxes=boxes[kept], scores=scores[kept],
                                phrases=tuple(instances[i][2] for i in kept))
        if not with_masks:
            return ImageResult(width, height, detections, ())
        # Sam3ImageProcessor.post_process_instance_segmentation: sigmoid, then resize, then threshold.
        probabilities = torch.stack([instances[i][3] for i in kept]).float().sigmoid()
        masks = upsample_probabilities(probabilities, item.size, budget_bytes=self.mask_budget_bytes)
        return ImageResult(width, height, detections, tuple(masks))

    # -- clicks / boxes → masks -------------------------------------------------------------------

    @torch.inference_mode()
    def features(self, image: Sam3Input | Image.Image, key: str | None) -> Sam3Features:
        """The image's backbone output: from the cache under ``key``, else computed (and cached)."""
        cached = self.cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        item = self._prepared([image() if callable(image) else image])[0]  # a deferred image decodes here
        features = Sam3Features(self._backbone(self.pixel_values([item])).last_hidden_state, item.size)
        if key is not None:
            self.cache.put(key, features)
        return features

    def warm(self, image, key: str) -> bool:
        """Compute ``image``'s backbone output into the cache under ``key`` unless it is there
        (pre-warming); True when it computed. ``image``: PIL, a Sam3Input or a PreparedImage-like
        object with ``for_segmenter()``."""
        if self.has_embedding(key):
            return False
        image = image() if callable(image) else image  # a deferred image decodes only now
        image = image.for_segmenter() if hasattr(image, "for_segmenter") else image
        with self._lock:
            self.features(image, key)
        return True

    def has_embedding(self, key: str | None) -> bool:
        """Whether ``key``'s backbone output is cached now (no hit or miss counted)."""
        return key is not None and key in self.cache

    def refine(self, image: Sam3Input | Image.Image, key: str | None,
               prompts: Sequence[MaskPrompt]) -> list[tuple[CompactMask, float]]:
        """Per prompt the best of the tracker's three candidate masks by predicted IoU: (mask, IoU)."""
        if not prompts:
            return []
        if callable(image) and not self.has_embedding(key):  # decode outside the lock (see Engine.refine)
            image = image()
        with self._lock:
            features = self.features(image, key)
            return refine_with_tracker(self.tracker, features.hidden, features.size, prompts, square=self.square,
                                       budget_bytes=self.mask_budget_bytes)

