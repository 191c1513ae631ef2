"""SAM, SAM-HQ and SAM 2.1 segmenters on tiny random-weight checkpoints: frames, batching, clicks on
a cached embedding, and equality with transformers' own pre- and post-processing (fp32, same weights).

The checkpoints are written by the real ``make-tiny-models`` command (fixtures ``tiny_models`` and
``tiny_family``). Random weights give meaningless but deterministic masks; every comparison first
checks they are non-empty and differ between boxes, so it cannot pass on blank output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.engine.embedcache import EmbeddingCache
from backend.engine.families import SEGMENTER_FAMILIES, require_family, segmenter_class
from backend.engine.masks import upsample_batch
from backend.errors import ModelLoadError
from backend.results import MaskPrompt

FAMILIES = ["sam", "sam-hq", "sam2"]
CPU = torch.device("cpu")
# (width, height, seed): landscape and portrait, neither the model's square.
IMAGES = [(200, 120, 0), (90, 210, 1)]
BOXES = [np.array([[10, 10, 110, 90], [60, 20, 190, 110], [0, 0, 200, 120]], np.float32),
         np.array([[5, 5, 80, 100], [10, 90, 85, 205]], np.float32)]


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse([width // 4, height // 4, 3 * width // 4, height // 2], fill=(250, 20, 20))
    return image


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [picture(*spec) for spec in IMAGES]


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tiny_family):
    """Factory: family → checkpoint directory (plain SAM comes with ``tiny_models``)."""
    return lambda family: tiny_models / "sam" if family == "sam" else tiny_family(family)


def load(directory):
    model_type = require_family("SAM_MODEL", str(directory), SEGMENTER_FAMILIES)
    return segmenter_class(model_type)(str(directory), CPU, torch.float32, batch_size=4)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """Factory: family → its segmenter (fp32, CPU, no cache), loaded once per module."""
    segmenters = {}

    def get(family: str):
        if family not in segmenters:
            segmenters[family] = load(checkpoint(family))
        return segmenters[family]

    return get


@pytest.fixture(params=FAMILIES)
def segmenter(request, loaded):
    return loaded(request.param)


def full(masks) -> np.ndarray:
    return np.stack([m.full() for m in masks])


def assert_informative(masks: np.ndarray) -> None:
    """Non-empty, not everything, and different from one box to the next."""
    assert masks.any(axis=(1, 2)).all() and not masks.all(axis=(1, 2)).any()
    assert all(not np.array_equal(a, b) for a, b in zip(masks, masks[1:]))


def test_families_load_as_their_own_class(loaded):
    names = [type(loaded(family)).__name__ for family in FAMILIES]
    assert names == ["SamSegmenter", "SamHQSegmenter", "Sam2Segmenter"]


def test_one_full_size_mask_per_box_and_batch_equals_one_by_one(segmenter, images):
    batched = segmenter.segment(images, BOXES)
    single = [segmenter.segment([image], [boxes])[0] for image, boxes in zip(images, BOXES)]
    for image, boxes, a, b in zip(images, BOXES, batched, single):
        assert len(a) == len(boxes) and {(m.height, m.width) for m in a} == {(image.height, image.width)}
        assert_informative(full(a))
        assert np.array_equal(full(a), full(b))


def test_refine_click_then_box_encodes_the_image_once(segmenter, images, monkeypatch):
    hits, encoded = [], []
    monkeypatch.setattr(segmenter, "cache", EmbeddingCache(2**30, on_hit=lambda: hits.append(1)))
    encode = segmenter._encode_pixels
    monkeypatch.setattr(segmenter, "_encode_pixels", lambda pixels: encoded.append(len(pixels)) or encode(pixels))
    image = images[0]
    click = MaskPrompt(None, np.array([[60.0, 40.0]]), np.array([1]))
    box = MaskPrompt(np.array([10.0, 10.0, 110.0, 90.0]), np.zeros((0, 2)), np.zeros(0, np.int64))
    (click_mask, click_score), = segmenter.refine(image, "key", [click])
    (box_mask, box_score), = segmenter.refine(image, "key", [box])
    assert encoded == [1] and hits == [1]  # one image encoded, once; the box found it cached
    assert isinstance(click_score, float) and isinstance(box_score, float)
    masks = full([click_mask, box_mask])
    assert masks.shape == (2, image.height, image.width)
    assert_informative(masks)


def _box_logits(segmenter, image, boxes) -> tuple[torch.Tensor, object]:
    """Our embedding of ``image`` and the decoder's (N, h, w) logits for ``boxes``."""
    embedding = segmenter.embed([image])[0]
    frame = segmenter._to_sam_frame(boxes.astype(np.float64), embedding, True)
    with torch.inference_mode():
        out = segmenter.model(**segmenter._decoder_inputs(embedding.tensors), multimask_output=False,
                              input_boxes=torch.tensor(frame[None], dtype=torch.float32))
    return out.pred_masks[0, :, 0], embedding


def _reference_post_process(segmenter, family, logits, image):
    """transformers' own post_process_masks on (N, h, w) logits → (N, H, W) bool."""
    if family == "sam2":
        from tests.reference import reference_class

        cls = reference_class("transformers.models.sam2.image_processing_sam2", "Sam2ImageProcessor")
        return cls.post_process_masks(None, [logits[:, None].clone()], [(image.height, image.width)])[0][:, 0].numpy()
    reshaped = segmenter.prepare(image).reshaped_size
    return segmenter.image_processor.post_process_masks(
        [logits[:, None].clone()], [(image.height, image.width)], [reshaped])[0][:, 0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_equal_the_reference_post_processing_on_the_same_logits(loaded, images, family):
    segmenter = loaded(family)
    for image, boxes in zip(images, BOXES):
        logits, embedding = _box_logits(segmenter, image, boxes)
        ours = full(upsample_batch([segmenter._mask_job(logits, embedding)]).result()[0][0])
        assert_informative(ours)
        assert np.array_equal(ours, _reference_post_process(segmenter, family, logits, image))
        # and segment() is exactly this path
        assert np.array_equal(full(segmenter.segment([image], [boxes])[0]), ours)


@pytest.mark.parametrize("family", ["sam", "sam-hq"])
def test_sam_and_hq_end_to_end_equal_the_processor_and_model_forward(loaded, images, family):
    """Ours (PIL resize on the host, normalize on the device, cached embedding, batched decoder)
    against the processor's preprocessing + the model's forward from pixels + post_process_masks.
    Pixels agree to float rounding (the processor normalizes in float64); the masks are equal."""
    from transformers import SamProcessor

    segmenter = loaded(family)
    processor = SamProcessor(image_processor=segmenter.image_processor)
    for image, boxes in zip(images, BOXES):
        inputs = processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        ours_pixels, _ = segmenter.normalize([segmenter.prepare(image).canvas], CPU, torch.float32)
        torch.testing.assert_close(ours_pixels, inputs["pixel_values"], atol=1e-5, rtol=0)
        with torch.inference_mode():
            out = segmenter.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                                  multimask_output=False)
        want = processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                            inputs["reshaped_input_sizes"])[0][:, 0].numpy()
        ours = full(segmenter.segment([image], [boxes])[0])
        assert_informative(want)
        assert np.array_equal(ours, want), family


def test_sam2_end_to_end_equals_pil_preprocessing_and_model_forward(loaded, images):
    """SAM 2's processor (Sam2ImageProcessor) needs torchvision, which this project does not
    install, so its preprocessing is replaced by what its config says, done directly: PIL resize
    to (S, S) with its resample, rescale, normalize by its mean/std. Ours must equal that; then the
    model's forward from those pixels, with boxes put in its frame by Sam2Processor's own
    coordinate transform, and Sam2ImageProcessor.post_process_masks must give our masks."""
    from transformers.models.sam2.processing_sam2 import Sam2Processor

    from tests.reference import reference_class

    post_process = reference_class("transformers.models.sam2.image_processing_sam2",
                                   "Sam2ImageProcessor").post_process_masks
    segmenter = loaded("sam2")
    config = segmenter.image_processor
    side = config.size["height"]
    mean, std = torch.tensor(config.image_mean).view(3, 1, 1), torch.tensor(config.image_std).view(3, 1, 1)
    for image, boxes in zip(images, BOXES):
        resized = np.asarray(image.resize((side, side), config.resample), np.float32)
        pixels = ((torch.from_numpy(resized).permute(2, 0, 1) * config.rescale_factor - mean) / std)[None]
        ours_pixels, valid = segmenter.normalize([segmenter.prepare(image).canvas], CPU, torch.float32)
        assert valid.all()  # stretched, not padded
        torch.testing.assert_close(ours_pixels, pixels, atol=1e-5, rtol=0)
        frame = Sam2Processor._normalize_coordinates(None, side, torch.from_numpy(boxes), (image.height, image.width),
                                                     is_bounding_box=True)
        embedding = segmenter.embed([image])[0]
        np.testing.assert_allclose(segmenter._to_sam_frame(boxes, embedding, True), frame.numpy(), rtol=1e-6)
        with torch.inference_mode():
            out = segmenter.model(pixel_values=pixels, input_boxes=frame[None], multimask_output=False)
        want = post_process(None, [out.pred_masks[0]], [(image.height, image.width)])[0][:, 0].numpy()
        ours = full(segmenter.segment([image], [boxes])[0])
        assert_informative(want)
        assert np.array_equal(ours, want)


def test_embedding_holds_every_tensor_the_decoder_reads(loaded, images):
    """SAM: one tensor; SAM-HQ: plus the first global ViT block; SAM 2: three feature levels."""
    counts = {}
    for family in FAMILIES:
        embedding = loaded(family).embed([images[0]])[0]
        counts[family] = len(embedding.tensors)
        assert embedding.nbytes == sum(t.numel() * t.element_size() for t in embedding.tensors) > 0
        assert all(t.shape[0] == 1 for t in embedding.tensors)
    assert counts == {"sam": 1, "sam-hq": 2, "sam2": 3}


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_loads_the_family_from_settings_and_runs(checkpoint, tiny_env, images, family):
    from backend.engine.engine import Engine
    from backend.settings import Settings

    settings = Settings.from_env({**tiny_env, "SAM_MODEL": str(checkpoint(family))})
    engine = Engine.from_settings(settings)
    result, = engine.run([images[1]], [["circle"]])
    assert len(result.masks) == len(result.detections) > 0
    assert result.full_masks().shape[1:] == (images[1].height, images[1].width) and result.full_masks().any()


def test_a_grounding_dino_dir_as_sam_model_is_a_load_error_naming_sam_model(tiny_models):
    with pytest.raises(ModelLoadError, match="SAM_MODEL") as error:
        require_family("SAM_MODEL", str(tiny_models / "grounding-dino"), SEGMENTER_FAMILIES)
    assert "grounding-dino" in str(error.value)
