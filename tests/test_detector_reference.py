"""Our Grounding DINO / MM-Grounding-DINO detector against transformers' own pipeline
(``GroundingDinoProcessor``: the PIL image processor + the tokenizer, then
``post_process_grounded_object_detection``), for both families on tiny random-weight checkpoints.

The model is run once per family and image through the reference processor, and the same outputs
go to both post-processings. Where their semantics coincide the results are equal: a single-phrase
prompt, NMS off (IoU threshold 1.0), the box and text thresholds equal, ``max_detections`` above the
number of queries. Deliberate differences, each a choice of :mod:`backend.engine.detector`:

- score: ours is the best probability among the **phrase's** tokens, the reference's the best
  among **all** the prompt's tokens, [CLS], '.' and [SEP] included. A random model often puts its
  best logit on those, so the test compares box for box: ours are a subset of the reference's,
  never scored higher, and equal for every query whose best token is a phrase token (and, on the
  outputs with the special tokens masked, the whole sets are equal).
- label: ours names the one prompt phrase whose span scores highest; the reference decodes the
  tokens above ``text_threshold``, which may be part of a phrase or run across two.
- boxes: ours are clipped to the image and those under 1 pixel wide or high are dropped; the
  reference's are not clipped.
- per-phrase NMS and ``max_detections``: the reference has neither.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, MMGroundingDinoForObjectDetection
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
from transformers.models.grounding_dino.processing_grounding_dino import GroundingDinoProcessor

from backend.engine.detector import GroundingDinoDetector
from backend.engine.families import DETECTOR_FAMILIES, require_family
from backend.errors import ModelLoadError
from backend.settings import DetectThresholds

CPU = torch.device("cpu")
PHRASE = "cat"
SIZES = {"landscape": (320, 240), "portrait": (240, 331)}  # (width, height)
NO_NMS = 1.0  # IoU never exceeds 1: nothing is suppressed
ALL = 10**6  # max_detections above any query count


@pytest.fixture(scope="module", params=["grounding-dino", "mm-grounding-dino"])
def dino_dir(request, tiny_models, tiny_family):
    return tiny_models / "grounding-dino" if request.param == "grounding-dino" else tiny_family(request.param)


@pytest.fixture(scope="module")
def detector(dino_dir):
    return GroundingDinoDetector(str(dino_dir), CPU, torch.float32, box_threshold=0.0, text_threshold=0.0,
                                 nms_threshold=NO_NMS, max_detections=ALL, batch_size=4)


@pytest.fixture(scope="module")
def processor(dino_dir):
    """transformers' processor for both families, built without torchvision (the PIL image processor)."""
    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil.from_pretrained(dino_dir),
                                  tokenizer=AutoTokenizer.from_pretrained(dino_dir))


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def forward(detector, processor):
    """orientation → (image, reference inputs, model outputs): one forward pass per family and image.

    The reference processor pads to our canvas (``pad_size``) so that both sides see the same
    forward: the model's outputs depend slightly on the padding around the image."""
    runs = {}
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        image = noise_image(width, height, seed)
        canvas_h, canvas_w = detector.prepare(image).canvas.shape
        inputs = processor(images=image, text=[PHRASE], return_tensors="pt",
                           pad_size={"height": canvas_h, "width": canvas_w})
        with torch.inference_mode():
            outputs = detector.model(**inputs)
        runs[name] = (image, inputs, outputs)
    return runs


def phrase_span(input_ids: torch.Tensor) -> slice:
    """Token positions of a single phrase: between [CLS] and the '.' before [SEP]."""
    return slice(1, int(input_ids.shape[-1]) - 2)


def reference(processor, outputs, input_ids, image, threshold: float) -> dict:
    result = processor.post_process_grounded_object_detection(
        outputs, input_ids=input_ids, threshold=threshold, text_threshold=threshold,
        target_sizes=[(image.height, image.width)])[0]
    return {key: value.numpy() if isinstance(value, torch.Tensor) else value for key, value in result.items()}


def ours(detector, outputs, input_ids, image, threshold: float):
    return detector._postprocess(outputs.logits[0].float().sigmoid().numpy(), outputs.pred_boxes[0].numpy(),
                                 input_ids[0].numpy(), [PHRASE], (image.height, image.width),
                                 DetectThresholds(threshold, threshold, NO_NMS, ALL))


def median_phrase_score(outputs, input_ids) -> float:
    """A threshold that keeps about half the queries (both sides must drop some and keep some),
    halfway between two queries' scores so float rounding cannot move a query across it."""
    scores = outputs.logits[0, :, phrase_span(input_ids)].float().sigmoid().max(-1).values.sort().values
    middle = len(scores) // 2
    return float(scores[middle - 1] + scores[middle]) / 2


def clipped(boxes: np.ndarray, image: Image.Image) -> np.ndarray:
    return np.clip(boxes, 0, [image.width, image.height, image.width, image.height]).astype(np.float32)


def assert_matches_reference(detections, expected: dict, outputs, input_ids, image, threshold: float,
                             tol: float = 1e-6) -> None:
    """Ours ⊆ the reference's boxes (clipped), never scored higher; equal, and all present, for the
    queries whose best token is a phrase token. ``tol``: on score and box (pixels/1000)."""
    probs = outputs.logits[0].float().sigmoid().numpy()
    queries = np.flatnonzero(probs.max(-1) > threshold)  # the reference keeps these, in query order
    assert len(queries) == len(expected["scores"])
    in_phrase = probs[queries, phrase_span(input_ids)].max(-1) == probs[queries].max(-1)
    ref_boxes = clipped(expected["boxes"], image)
    wide = (ref_boxes[:, 2] - ref_boxes[:, 0] >= 1) & (ref_boxes[:, 3] - ref_boxes[:, 1] >= 1)
    matched = set()
    for box, score in zip(detections.boxes, detections.scores):
        hits = np.flatnonzero(np.abs(ref_boxes - box).max(axis=1) < 1000 * tol)
        assert len(hits) == 1, f"our box {box} is not one of the reference's"
        index = int(hits[0])
        matched.add(index)
        assert score <= expected["scores"][index] + tol
        if in_phrase[index]:
            assert score == pytest.approx(expected["scores"][index], abs=tol)
    coinciding = set(np.flatnonzero(in_phrase & wide).tolist())
    assert len(coinciding) >= 2, "too few queries where the semantics coincide: the comparison would be vacuous"
    assert coinciding <= matched


@pytest.mark.parametrize("orientation", SIZES)
def test_post_processing_agrees_with_transformers(detector, processor, forward, orientation):
    image, inputs, outputs = forward[orientation]
    threshold = median_phrase_score(outputs, inputs["input_ids"])
    detections = ours(detector, outputs, inputs["input_ids"], image, threshold)
    expected = reference(processor, outputs, inputs["input_ids"], image, threshold)
    assert 0 < len(detections) < outputs.logits.shape[1] and set(detections.phrases) == {PHRASE}
    assert len(np.unique(detections.boxes, axis=0)) == len(detections)  # distinct boxes: matching is unambiguous
    assert_matches_reference(detections, expected, outputs, inputs["input_ids"], image, threshold)
    # The reference names each box by its tokens above text_threshold: never empty, a part of the prompt.
    assert all(label.strip() for label in expected["text_labels"])


@pytest.mark.parametrize("orientation", SIZES)
def test_same_boxes_and_scores_when_only_the_phrase_scores(detector, processor, forward, orientation):
    """With [CLS], '.' and [SEP] masked out of the same outputs both scores are the phrase's: the
    whole sets are equal (the reference's boxes clipped to the image, as ours are)."""
    image, inputs, outputs = forward[orientation]
    span = phrase_span(inputs["input_ids"])
    logits = torch.full_like(outputs.logits, float("-inf"))
    logits[:, :, span] = outputs.logits[:, :, span]
    masked = type(outputs)(logits=logits, pred_boxes=outputs.pred_boxes)
    threshold = median_phrase_score(outputs, inputs["input_ids"])
    detections = ours(detector, masked, inputs["input_ids"], image, threshold)
    expected = reference(processor, masked, inputs["input_ids"], image, threshold)
    order = np.argsort(-expected["scores"], kind="stable")
    assert 2 <= len(detections) < outputs.logits.shape[1]
    np.testing.assert_allclose(detections.boxes, clipped(expected["boxes"][order], image), atol=1e-3)
    np.testing.assert_allclose(detections.scores, expected["scores"][order], atol=1e-6)


@pytest.mark.parametrize("orientation", SIZES)
def test_preprocessing_equals_the_pil_processor(detector, forward, orientation):
    image, inputs, _ = forward[orientation]
    pixels, valid = detector.normalize([detector.prepare(image).canvas], CPU, torch.float32)
    assert inputs["pixel_mask"].float().mean() < 1  # the canvas is padded: the mask is checked too
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(valid.long(), inputs["pixel_mask"])


@pytest.mark.parametrize("orientation", SIZES)
def test_detect_end_to_end_agrees_with_the_reference_pipeline(detector, processor, forward, orientation):
    """Our prepare + detect against the reference processor + model + post-processing. Our pixels
    are normalized in float32 on the device, the processor's in float64: outputs agree to ~1e-6."""
    image, inputs, outputs = forward[orientation]
    threshold = median_phrase_score(outputs, inputs["input_ids"])
    limits = DetectThresholds(threshold, threshold, NO_NMS, ALL)
    detections = detector.detect([image], [[PHRASE]], [limits])[0]
    expected = reference(processor, outputs, inputs["input_ids"], image, threshold)
    assert 0 < len(detections) < outputs.logits.shape[1]
    assert_matches_reference(detections, expected, outputs, inputs["input_ids"], image, threshold, tol=1e-4)


def test_batched_equals_one_by_one(detector):
    images = [noise_image(320, 240, 3), noise_image(240, 331, 4), noise_image(301, 199, 5)]
    phrases = [["circle", "square"], [PHRASE], ["red car", "dog"]]
    batched = detector.detect(images, phrases)
    single = [detector.detect([image], [p])[0] for image, p in zip(images, phrases)]
    for a, b in zip(batched, single):
        assert len(a) > 0 and a.phrases == b.phrases
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert not np.array_equal(batched[0].boxes[:3], batched[2].boxes[:3])  # the images' boxes differ


def test_each_family_loads_its_own_model_class(detector, dino_dir):
    assert require_family("GROUNDING_DINO_MODEL", str(dino_dir), DETECTOR_FAMILIES) == detector.model.config.model_type
    is_mm = detector.model.config.model_type == "mm-grounding-dino"
    assert isinstance(detector.model, MMGroundingDinoForObjectDetection) == is_mm


def test_mm_grounding_dino_loads_through_the_settings(tiny_settings, tiny_family):
    from backend.engine.engine import Engine

    mm_dir = str(tiny_family("mm-grounding-dino"))
    engine = Engine.from_settings(replace(tiny_settings, grounding_dino_model=mm_dir))
    assert isinstance(engine.detector.model, MMGroundingDinoForObjectDetection)
    result = engine.run([noise_image(96, 64, 6)], [[PHRASE]])[0]
    assert 0 < len(result.detections) and len(result.masks) == len(result.detections)


def test_a_sam_checkpoint_is_no_detector(tiny_models):
    with pytest.raises(ModelLoadError, match="GROUNDING_DINO_MODEL"):
        require_family("GROUNDING_DINO_MODEL", str(tiny_models / "sam"), DETECTOR_FAMILIES)
    with pytest.raises(ValueError, match="'sam' checkpoint"):
        GroundingDinoDetector(str(tiny_models / "sam"), CPU, torch.float32, box_threshold=0.3, text_threshold=0.25,
                              nms_threshold=0.5, max_detections=10, batch_size=1)
