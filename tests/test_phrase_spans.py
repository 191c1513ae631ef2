"""The detector's phrase spans against the model's own phrase blocks: transformers'
``generate_masks_with_special_tokens_and_transfer_map`` restricts the text self-attention to the
tokens between two separators ([CLS], [SEP], '.', '?'); each of our spans must be one such block,
so the score of a phrase is read from the tokens the model grounded as that phrase."""

import numpy as np
import pytest
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import (
    SPECIAL_TOKENS, generate_masks_with_special_tokens_and_transfer_map)

from backend.engine.detector import GroundingDinoDetector
from backend.ls.tasks import PromptLimits, split_prompt
from backend.settings import DetectThresholds

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["grounding-dino", "mm-grounding-dino"])
def detector(request, tiny_models, tiny_family):
    source = tiny_models / "grounding-dino" if request.param == "grounding-dino" else tiny_family(request.param)
    return GroundingDinoDetector(str(source), CPU, torch.float32, box_threshold=0.3, text_threshold=0.25,
                                 nms_threshold=0.5, max_detections=10, batch_size=1)


def model_blocks(input_ids: np.ndarray, special_tokens) -> set[tuple[int, int]]:
    """The model's phrase blocks as token [start, end): from its text self-attention mask, each row
    of a non-separator token attends to exactly its block plus the separator that closes it."""
    mask, _ = generate_masks_with_special_tokens_and_transfer_map(
        torch.as_tensor(input_ids)[None], torch.as_tensor(list(special_tokens)))
    mask = mask[0].numpy()
    blocks = set()
    for row, token in enumerate(input_ids):
        if token not in special_tokens:
            attended = np.flatnonzero(mask[row])
            assert (np.diff(attended) == 1).all(), "a block is a contiguous run"
            assert input_ids[attended[-1]] in special_tokens, "closed by a separator"
            blocks.add((int(attended[0]), int(attended[-1])))  # the closing separator excluded
    return blocks


def test_the_detector_splits_where_the_model_does(detector):
    assert detector.separator_ids == set(SPECIAL_TOKENS)
    assert set(detector.model.model.special_tokens.tolist()) == detector.separator_ids


@pytest.mark.parametrize("text", ["cat ? dog .", "cat? red car . dog ?", "is it a cat ? . dog .", "a . b ? c ."])
def test_phrase_spans_are_the_models_attention_blocks(detector, text):
    ids = np.array(detector.tokenizer(text)["input_ids"])
    spans = detector._phrase_spans(ids, 99)
    assert {span for span in spans if span[1] > span[0]} == model_blocks(ids, detector.separator_ids)


def test_a_prompt_with_a_question_mark_grounds_each_phrase(detector):
    phrases = split_prompt("cat? red car . dog", PromptLimits())
    assert phrases == ["cat", "red car", "dog"]
    ids = np.array(detector.tokenizer(detector.prompt_for(phrases))["input_ids"])
    spans = detector._phrase_spans(ids, len(phrases))
    assert [detector.tokenizer.decode(ids[s:e]) for s, e in spans] == phrases
    assert set(spans) == model_blocks(ids, detector.separator_ids)


def test_a_separator_inside_a_label_keeps_the_phrase_one_block(detector):
    """A label (the prompt when none is given) may hold '.' or '?': the model would split it in two
    and every later phrase would read the previous one's tokens, so the prompt spaces it out."""
    phrases = ["st. bernard", "is it a cat?", "dog"]
    ids = np.array(detector.tokenizer(detector.prompt_for(phrases))["input_ids"])
    spans = detector._phrase_spans(ids, len(phrases))
    assert [detector.tokenizer.decode(ids[s:e]) for s, e in spans] == ["st bernard", "is it a cat", "dog"]
    assert set(spans) == model_blocks(ids, detector.separator_ids)


def test_detect_names_only_prompt_phrases_for_a_label_with_a_question_mark(detector):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    everything = DetectThresholds(box=0.0, text=0.0, nms=1.0, max_detections=50)
    detections = detector.detect([image], [["is it a cat?", "dog"]], [everything])[0]
    assert len(detections) and set(detections.phrases) <= {"is it a cat?", "dog"}
