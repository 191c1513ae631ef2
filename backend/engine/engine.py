"""The GPU stage: Grounding DINO turns phrases into boxes, SAM turns boxes into masks.

All coordinates that enter or leave the engine are in the pixel frame of the EXIF-transposed
image (the image Label Studio displays): boxes are ``(N, 4)`` float32 XYXY pixels, masks are
:class:`CompactMask` (crops of full-size bool masks). Model-specific frames (DINO's normalized
cxcywh, SAM's 1024-pixel padded square) never leave the engine. Modules:

- ``detector``: Grounding DINO; ``segmenter``: SAM; ``masks``: mask upsampling on the device;
- ``device``: device, dtype, TF32 and BATCH_SIZE=auto; ``compiling``: COMPILE=1 (regional, bucketed, at load).

Every model has a CPU half, ``prepare(image)`` (resize, normalize, pad: thread-safe, run ahead of
the GPU by the pipeline's thread pool), and a device half that runs batches of prepared images.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from backend.engine.embedcache import EmbeddingCache, embedding_cache
from backend.engine.families import DETECTOR_FAMILIES, SEGMENTER_FAMILIES, load_error, require_family, segmenter_class
from backend.engine.detector import DinoInput, GroundingDinoDetector, nms
from backend.engine.compiling import use_compile_cache, warm_buckets
from backend.engine.device import auto_batch_size, configure_device, resolve_device, resolve_dtype
from backend.engine.segmenter import ImageEmbedding, SamInput, SamSegmenter
from backend.results import CompactMask, Detections, ImageResult, MaskPrompt
from backend.settings import DEFAULT_BATCH_SIZE, DetectThresholds, EngineKind

__all__ = ["Engine", "PreparedImage"]

log = logging.getLogger(__name__)


def build_engine(settings, metrics=None):
    """The engine ENGINE names: :class:`Engine` (detector + segmenter) or SAM 3's. Both have
    ``prepare``, ``run``, ``detect``, ``refine``, ``probe``, ``batch_size`` and ``set_batch_size``.

    Raises ModelLoadError when the models cannot be loaded."""
    if settings.engine is EngineKind.SAM3:
        from backend.engine.sam3 import Sam3Engine

        return Sam3Engine.from_settings(settings, metrics)
    return Engine.from_settings(settings, metrics)


class Detector(Protocol):
    """``thresholds`` is passed only when some image has its own (see :meth:`Engine.run`)."""

    def detect(self, inputs: Sequence[Any], phrases: Sequence[Sequence[str]],
               thresholds: Sequence[DetectThresholds | None] | None = None) -> list[Detections]: ...


class Segmenter(Protocol):
    def segment(self, inputs: Sequence[Any], boxes: Sequence[np.ndarray],
                keys: Sequence[str | None] | None = None) -> list[list[CompactMask]]: ...


@dataclass(frozen=True)
class PreparedImage:
    """An image with its model inputs already computed on the CPU (None for a model without a
    ``prepare``, such as a test stub, which then gets the PIL image itself)."""

    image: Image.Image
    dino: DinoInput | None
    sam: SamInput | None

    def for_detector(self):
        return self.dino if self.dino is not None else self.image

    def for_segmenter(self):
        return self.sam if self.sam is not None else self.image


@dataclass(frozen=True)
class _Done:
    """Detections already computed, with the ``result()`` of a pending detector launch."""

    detections: list[Detections]

    def result(self) -> list[Detections]:
        return self.detections


class Engine:
    """Detector + segmenter behind one lock: request threads share the models, one batch at a time.

    ``prepare(image)`` needs no lock (CPU work, run it in threads ahead of ``run``);
    ``run(images, phrases)`` → one :class:`ImageResult` per image, in the pixel frame of each image.
    """

    def __init__(self, detector: Detector, segmenter: Segmenter):
        self.detector, self.segmenter = detector, segmenter
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, metrics=None) -> "Engine":
        """Load GROUNDING_DINO_MODEL and SAM_MODEL, each by the family its config names.

        Raises ModelLoadError (naming the setting and the fix) when either cannot be loaded."""
        detector_type = require_family("GROUNDING_DINO_MODEL", settings.grounding_dino_model, DETECTOR_FAMILIES)
        segmenter_type = require_family("SAM_MODEL", settings.sam_model, SEGMENTER_FAMILIES)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        configure_device(device, settings.flush_denormals)
        batch_size = settings.batch_size or 1  # auto: probed below once the models are loaded
        log.info("loading models on %s (%s%s): %s (%s), %s (%s)", device, dtype, ", compiled" if settings.compile else "",
                 settings.grounding_dino_model, detector_type, settings.sam_model, segmenter_type)
        if settings.compile and settings.compile_cache_dir:
            use_compile_cache(settings.compile_cache_dir, device)
        try:
            detector = GroundingDinoDetector(
                settings.grounding_dino_model, device, dtype, box_threshold=settings.box_threshold,
                text_threshold=settings.text_threshold, nms_threshold=settings.nms_threshold,
                max_detections=settings.max_detections, batch_size=batch_size, compile=settings.compile)
        except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear state
            raise load_error("GROUNDING_DINO_MODEL", settings.grounding_dino_model, exc) from exc
        try:
            segmenter = segmenter_class(segmenter_type)(
                settings.sam_model, device, dtype, batch_size=batch_size, cache=embedding_cache(settings, metrics),
                compile=settings.compile, attention=settings.sam_attention)
        except Exception as exc:  # noqa: BLE001
            raise load_error("SAM_MODEL", settings.sam_model, exc) from exc
        engine = cls(detector, segmenter)
        if settings.batch_size is None:
            engine.set_batch_size(auto_batch_size(device, engine.probe))
        if settings.compile:  # ready means compiled: no request waits for a compile
            warm_buckets(engine.probe_both_canvases, engine.batch_size, "grounded-sam")
        return engine

    @property
    def batch_size(self) -> int:
        return getattr(self.detector, "batch_size", DEFAULT_BATCH_SIZE)

    def set_batch_size(self, batch_size: int) -> None:
        self.detector.batch_size = self.segmenter.batch_size = batch_size

    def probe(self, batch_size: int) -> None:
        """Run ``batch_size`` blank landscape images (DINO's largest canvas) through both models,
        five boxes each: the peak memory of a real batch, for BATCH_SIZE=auto."""
        detector: GroundingDinoDetector = self.detector  # type: ignore[assignment]
        height, width = detector.canvas_for(2, 1)
        image = Image.new("RGB", (width, height))
        prepared = [self.prepare(image)] * batch_size
        with self._batch_size_of(batch_size):
            self.detector.detect([p.for_detector() for p in prepared], [["object"]] * batch_size)
            boxes = np.tile(np.array([[0, 0, width / 2, height / 2]], np.float32), (5, 1))
            self.segmenter.segment([p.for_segmenter() for p in prepared], [boxes] * batch_size)

    def probe_both_canvases(self, batch_size: int) -> None:
        """:meth:`probe`, then DINO alone on its portrait canvas: every input shape the encoders
        take at this batch size (COMPILE=1 compiles them all at load with it)."""
        self.probe(batch_size)
        detector: GroundingDinoDetector = self.detector  # type: ignore[assignment]
        height, width = detector.canvas_for(1, 2)
        portrait = detector.prepare(Image.new("RGB", (width, height)))
        with self._batch_size_of(batch_size):
            detector.detect([portrait] * batch_size, [["object"]] * batch_size)

    @contextlib.contextmanager
    def _batch_size_of(self, batch_size: int):
        """Both models at ``batch_size`` for the block (a probe's batch is one chunk), then back."""
        saved = self.batch_size
        self.set_batch_size(batch_size)
        try:
            yield
        finally:
            self.set_batch_size(saved)

    def prepare(self, image: Image.Image) -> PreparedImage:
        """The CPU half of both models for one image (thread-safe; no lock, no device work)."""
        dino = self.detector.prepare(image) if hasattr(self.detector, "prepare") else None
        sam = self.segmenter.prepare(image) if hasattr(self.segmenter, "prepare") else None
        return PreparedImage(image, dino, sam)

    def run(self, images: Sequence[Image.Image | PreparedImage], phrases: Sequence[Sequence[str]],
            keys: Sequence[str] | None = None,
            thresholds: Sequence[DetectThresholds | None] | None = None) -> list[ImageResult]:
        """Text → boxes → masks. With ``keys`` (content hashes) SAM embeddings are cached for clicks.

        ``thresholds``: per image, the detector thresholds of its request (None: the deployment's)."""
        prepared = [item if isinstance(item, PreparedImage) else self.prepare(item) for item in images]
        sam_inputs = [p.for_segmenter() for p in prepared]
        with self._lock:
            pending = self._launch_detect([p.for_detector() for p in prepared], phrases, thresholds)
            early = self._encode_ahead(sam_inputs, phrases, keys)
            detections = pending.result()  # the host post-processes while the device encodes
            if early is None:
                masks = self.segmenter.segment(sam_inputs, [d.boxes for d in detections], keys)
            else:
                masks = self.segmenter.segment(sam_inputs, [d.boxes for d in detections], keys, embeddings=early)
        return [ImageResult(width=p.image.width, height=p.image.height, detections=d, masks=tuple(m))
                for p, d, m in zip(prepared, detections, masks)]

    def detect(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]],
               thresholds: Sequence[DetectThresholds | None] | None = None) -> list[Detections]:
        with self._lock:
            return self._detect(images, phrases, thresholds)

    def _encode_ahead(self, inputs, phrases, keys) -> list[ImageEmbedding | None] | None:
        """On CUDA, SAM's embeddings of the images that have phrases, queued right behind the
        detector's forward: the device encodes while the host waits for and post-processes the
        boxes. Elsewhere (or for a batch larger than the segmenter's) None: the CPU does one thing at
        a time, so encoding an image in which nothing is found would only cost time."""
        device = getattr(self.segmenter, "device", None)
        if device is None or device.type != "cuda" or len(inputs) > self.segmenter.batch_size:
            return None
        wanted = [i for i, p in enumerate(phrases) if p]
        if not wanted:
            return None
        encoded = self.segmenter.embed([inputs[i] for i in wanted], [keys[i] for i in wanted] if keys else None)
        early: list[ImageEmbedding | None] = [None] * len(inputs)
        for i, embedding in zip(wanted, encoded):
            early[i] = embedding
        return early

    def _launch_detect(self, inputs, phrases, thresholds):
        """The detector's forwards, queued (its ``launch``; a detector without one, such as a test
        stub, runs ``detect`` now): something whose ``result()`` is the detections."""
        launch = getattr(self.detector, "launch", None)
        call = launch if launch is not None else self.detector.detect
        # Only images with thresholds of their own make a detector see the argument, so a detector
        # without per-image thresholds (a test stub) keeps serving requests that set none.
        if thresholds is None or all(t is None for t in thresholds):
            outcome = call(inputs, phrases)
        else:
            outcome = call(inputs, phrases, thresholds)
        return outcome if launch is not None else _Done(outcome)

    def _detect(self, inputs, phrases, thresholds) -> list[Detections]:
        return self._launch_detect(inputs, phrases, thresholds).result()

    def warm(self, image: Image.Image | PreparedImage | Callable[[], Image.Image], key: str) -> bool:
        """Encode ``image`` into the embedding cache under ``key`` unless it is there already (one
        encoder call under the lock, for pre-warming); True when it encoded."""
        if self.segmenter.has_embedding(key):
            return False
        image = image() if callable(image) else image  # a deferred image decodes only now
        sam = image.for_segmenter() if isinstance(image, PreparedImage) else image
        if isinstance(sam, Image.Image) and hasattr(self.segmenter, "prepare"):
            sam = self.segmenter.prepare(sam)  # CPU work: outside the lock
        with self._lock:
            self.segmenter.embed([sam], [key])
        return True

    def refine(self, image: Image.Image | Callable[[], Image.Image], key: str | None,
               prompts: Sequence[MaskPrompt]) -> list[tuple[CompactMask, float]]:
        """Clicks/boxes → masks on one image, reusing its cached SAM embedding when there is one.

        ``image`` may be a callable returning the pixels (a deferred image): it is called only when
        the embedding is not cached, and then before taking the lock, so decoding never holds up
        other requests' model calls (if the entry is evicted in between, the segmenter calls it)."""
        if callable(image) and not (hasattr(self.segmenter, "has_embedding") and self.segmenter.has_embedding(key)):
            image = image()
        with self._lock:
            return self.segmenter.refine(image, key, prompts)

