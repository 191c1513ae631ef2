"""ENGINE=sam3 on a tiny random-weight SAM 3 (built by ``make-tiny-models --family sam3``): concept
prompts → instances, batching, feature reuse, clicks on cached features, and equivalence with
transformers' own post-processing and tracker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.errors import ModelLoadError
from backend.results import MaskPrompt
from backend.settings import DetectThresholds, Settings
from tests.reference import reference_class

PHRASES = [["cat", "red car"], ["red car", "dog"]]
NO_FILTER = DetectThresholds(box=0.0, text=0.0, nms=1.0, max_detections=1000)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse([width // 4, height // 4, width // 2, height // 2], fill=(250, 20, 20))
    return image


@pytest.fixture(scope="module")
def images():
    return [picture(90, 60, 0), picture(50, 84, 1)]  # landscape, portrait


@pytest.fixture(scope="module")
def sam3(tiny_family):
    from backend.engine.sam3 import Sam3Engine

    env = {"ENGINE": "sam3", "SAM3_MODEL": str(tiny_family("sam3")), "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0",
           "NMS_THRESHOLD": "1", "MAX_DETECTIONS": "1000", "BATCH_SIZE": "4", "DEVICE": "cpu"}
    return Sam3Engine.from_settings(Settings.from_env(env))


@pytest.fixture
def backbone_calls(sam3, monkeypatch):
    """Images seen by the ViT backbone (the vision encoder shared by detector and tracker), per call."""
    backbone = sam3.model.vision_encoder.backbone
    calls: list[int] = []
    original = backbone.forward

    def counting(pixel_values, *args, **kwargs):
        calls.append(pixel_values.shape[0])
        return original(pixel_values, *args, **kwargs)

    monkeypatch.setattr(backbone, "forward", counting)
    return calls


def test_instances_of_every_phrase_in_the_image_frame(sam3, images):
    for image, phrases, result in zip(images, PHRASES, sam3.run(images, PHRASES)):
        detections = result.detections
        assert len(detections) > 0 and set(detections.phrases) == set(phrases)  # thresholds 0: all queries
        assert (result.width, result.height) == image.size
        boxes = detections.boxes
        assert boxes.dtype == np.float32 and boxes.shape == (len(detections), 4)
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= image.width).all() and (boxes[:, [1, 3]] <= image.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert list(detections.scores) == sorted(detections.scores, reverse=True)
        masks = result.full_masks()
        assert masks.shape == (len(detections), image.height, image.width)
        assert masks.any(axis=(1, 2)).sum() >= 2
        assert len({m.tobytes() for m in masks}) > 1  # masks differ between instances


def test_thresholds_filter_suppress_and_cap(sam3, images):
    everything = sam3.run(images[:1], PHRASES[:1])[0].detections
    cut = float(np.median(everything.scores))
    limited = sam3.run(images[:1], PHRASES[:1], thresholds=[DetectThresholds(cut, 0.0, 0.5, 3)])[0].detections
    assert 0 < len(limited) <= 3 and (limited.scores > cut).all()
    np.testing.assert_array_equal(limited.scores, np.sort(everything.scores[everything.scores > cut])[::-1][:len(limited)])


def test_batched_equals_one_by_one(sam3, images):
    batched = sam3.run(images, PHRASES)
    for image, phrases, together in zip(images, PHRASES, batched):
        alone = sam3.run([image], [phrases])[0]
        assert together.detections.phrases == alone.detections.phrases
        np.testing.assert_array_equal(together.detections.boxes, alone.detections.boxes)
        np.testing.assert_array_equal(together.detections.scores, alone.detections.scores)
        np.testing.assert_array_equal(together.full_masks(), alone.full_masks())


def test_vision_features_are_computed_once_per_image(sam3, images, backbone_calls):
    sam3.run(images, [["cat", "red car", "dog"], ["dog", "bird", "cat"]])
    assert backbone_calls == [2]  # one batch of both images, whatever the phrase count


def test_detect_is_run_without_masks_and_images_without_phrases_skip_the_model(sam3, images, backbone_calls):
    full = sam3.run(images[:1], PHRASES[:1])[0]
    backbone_calls.clear()
    detected, nothing = sam3.detect(images, [PHRASES[0], []])
    assert backbone_calls == [1] and len(nothing) == 0 and len(detected) > 0
    assert detected.phrases == full.detections.phrases
    np.testing.assert_array_equal(detected.boxes, full.detections.boxes)
    np.testing.assert_array_equal(detected.scores, full.detections.scores)


def test_preprocessing_is_a_pil_resize_and_normalise(sam3, images):
    size = sam3.square
    for image in images:
        expected = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255
        expected = ((expected - 0.5) / 0.5).transpose(2, 0, 1)  # the checkpoint's mean and std
        np.testing.assert_allclose(sam3.pixel_values([image])[0].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("image_index", [0, 1])
def test_instances_equal_transformers_post_processing(sam3, images, image_index):
    processor = reference_class("transformers.models.sam3.image_processing_sam3", "Sam3ImageProcessor")
    image = images[image_index]
    for phrase in PHRASES[image_index]:
        with torch.inference_mode():
            outputs = sam3.model(pixel_values=sam3.pixel_values([image]), **sam3.tokenize([phrase]))
        cut = float((outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid()).median())
        reference = processor.post_process_instance_segmentation(
            None, outputs, threshold=cut, mask_threshold=0.5, target_sizes=[(image.height, image.width)])[0]
        ours = sam3.run([image], [[phrase]], thresholds=[DetectThresholds(cut, 0.0, 1.0, 1000)])[0]
        order = torch.argsort(reference["scores"], descending=True, stable=True)
        assert 0 < len(ours.detections) == len(order) < outputs.pred_logits.shape[1]
        np.testing.assert_allclose(ours.detections.scores, reference["scores"][order].numpy(), rtol=1e-6)
        clipped = reference["boxes"][order].clamp(min=0).minimum(
            torch.tensor([image.width, image.height, image.width, image.height], dtype=torch.float32))
        np.testing.assert_allclose(ours.detections.boxes, clipped.numpy(), atol=1e-4)
        np.testing.assert_array_equal(ours.full_masks(), reference["masks"][order].numpy().astype(bool))


PROMPTS = {
    "click": MaskPrompt(None, np.array([[30.0, 20.0], [70.0, 45.0]]), np.array([1, 0])),
    "box": MaskPrompt(np.array([10.0, 8.0, 60.0, 50.0], np.float32), np.zeros((0, 2)), np.zeros(0, np.int64)),
}


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_refine_reuses_the_cached_features_and_equals_the_tracker(sam3, images, backbone_calls, kind):
    image, prompt = images[0], PROMPTS[kind]
    sam3.run([image], [["cat"]], keys=[f"image-{kind}"])
    backbone_calls.clear()
    (mask, score), = sam3.refine(image, f"image-{kind}", [prompt])
    assert backbone_calls == []  # the cached backbone output served the click
    assert not mask.is_empty
    # The reference: transformers' tracker end to end from pixels (its own backbone pass and neck).
    scale = np.array([sam3.square / image.width, sam3.square / image.height])
    kwargs = {}
    if len(prompt.points):
        kwargs["input_points"] = torch.tensor(prompt.points * scale, dtype=torch.float32)[None, None]
        kwargs["input_labels"] = torch.tensor(prompt.point_labels)[None, None]
    if prompt.box is not None:
        kwargs["input_boxes"] = torch.tensor(prompt.box.reshape(2, 2) * scale, dtype=torch.float32).reshape(1, 1, 4)
    with torch.inference_mode():
        outputs = sam3.tracker(pixel_values=sam3.pixel_values([image]), multimask_output=True, **kwargs)
    best = int(outputs.iou_scores[0, 0].argmax())
    assert score == pytest.approx(float(outputs.iou_scores[0, 0, best]), abs=1e-5)
    processor = reference_class("transformers.models.sam3.image_processing_sam3", "Sam3ImageProcessor")
    expected = processor.post_process_masks(None, [outputs.pred_masks[0, :, best:best + 1]],
                                            [(image.height, image.width)])[0][0, 0]
    np.testing.assert_array_equal(mask.full(), expected.numpy())


def test_refine_without_a_cached_image_computes_and_caches(sam3, images, backbone_calls):
    first = sam3.refine(images[1], "fresh", [PROMPTS["click"]])
    second = sam3.refine(images[1], "fresh", [PROMPTS["click"]])
    assert backbone_calls == [1]
    np.testing.assert_array_equal(first[0][0].full(), second[0][0].full())
    assert first[0][1] == second[0][1]


def test_a_non_sam3_checkpoint_is_a_load_error_naming_sam3_model(tiny_models):
    from backend.engine.sam3 import Sam3Engine

    settings = Settings.from_env({"ENGINE": "sam3", "SAM3_MODEL": str(tiny_models / "sam"), "DEVICE": "cpu"})
    with pytest.raises(ModelLoadError, match="SAM3_MODEL"):
        Sam3Engine.from_settings(settings)


def test_a_detector_only_checkpoint_is_a_load_error_naming_the_tracker(sam3, tiny_family, tmp_path):
    from backend.engine.sam3 import Sam3Engine

    source = tiny_family("sam3")
    sam3.model.save_pretrained(tmp_path)  # a bare 'sam3' checkpoint: no tracker weights
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    settings = Settings.from_env({"ENGINE": "sam3", "SAM3_MODEL": str(tmp_path), "DEVICE": "cpu"})
    with pytest.raises(ModelLoadError, match="SAM3_MODEL.*no tracker weights"):
        Sam3Engine.from_settings(settings)
