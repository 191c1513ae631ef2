"""The streaming tracker against transformers' whole-clip Sam2VideoModel session, on a tiny
random-weight SAM 2.1 video checkpoint built by ``make-tiny-models --family sam2-video``.

Our :class:`TrackingSession` drops frames and outputs older than the model's memory window every
``chunk`` frames; transformers' way keeps the whole clip. Both must give the same masks: within
one chunk, across chunk seams, and backward (a reversed stream against ``reverse=True``).
Tolerance: mask logits within 1e-4 absolute (float32 on the CPU; the computations are the same
operations on the same inputs, so in practice they are bit-identical), binary masks equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine.tiny import make_family_model
from backend.engine.tracker import VideoTracker, mask_iou
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

WIDTH, HEIGHT, FRAMES = 96, 64, 40
BOXES = np.array([[5, 5, 40, 40], [50, 10, 90, 60]], np.float64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_family_model(tmp_path_factory.mktemp("models"), "sam2-video"))


@pytest.fixture(scope="module")
def clip():
    """A moving bright square on noise: frames whose content changes, so memory matters."""
    rng = np.random.default_rng(1)
    frames = []
    for i in range(FRAMES):
        image = rng.integers(0, 80, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        image[10 + i // 4:30 + i // 4, 10 + i:30 + i] = 250
        frames.append(image)
    return frames


def whole_clip_logits(tracker: VideoTracker, frames, reverse: bool = False) -> dict[int, torch.Tensor]:
    """transformers' own way: one session holding every frame, propagate_in_video_iterator."""
    video = torch.stack([tracker.pixels(f) for f in frames])
    session = Sam2VideoInferenceSession(video=video, video_height=HEIGHT, video_width=WIDTH, dtype=torch.float32)
    start = len(frames) - 1 if reverse else 0
    scale = np.array([tracker.square / WIDTH, tracker.square / HEIGHT] * 2)
    for obj_id, box in enumerate(BOXES):
        obj_idx = session.obj_id_to_idx(obj_id)
        session.add_point_inputs(obj_idx, start, {
            "point_coords": torch.tensor((box * scale).reshape(1, 1, 2, 2), dtype=torch.float32),
            "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})
    session.obj_with_new_inputs = list(range(len(BOXES)))
    out = {}
    with torch.inference_mode():
        for step in tracker.model.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
            out[step.frame_idx] = step.pred_masks[:, 0].clone()
    return out


def streamed_logits(tracker: VideoTracker, frames, order) -> dict[int, torch.Tensor]:
    session = tracker.session(WIDTH, HEIGHT)
    session.prompt_boxes(order[0], list(range(len(BOXES))), BOXES)
    out, held = {}, []
    for frame in order:
        result = session.track(frame, frames[frame])
        out[frame] = result
        held.append(session.held_frames())
    return out, max(held)


@pytest.mark.parametrize("chunk", [64, 8])  # 64: one chunk holds the clip; 8: pruned every 8 frames
def test_streaming_equals_the_whole_clip_session(checkpoint, clip, chunk):
    tracker = VideoTracker(checkpoint, torch.device("cpu"), torch.float32, chunk=chunk)
    expected = whole_clip_logits(tracker, clip)
    got, held = streamed_logits(tracker, clip, list(range(FRAMES)))
    assert sorted(expected) == sorted(got) == list(range(FRAMES))
    for frame in range(FRAMES):
        want = expected[frame] > 0
        assert torch.equal(got[frame].low, want), f"frame {frame}: masks differ"
    if chunk == 8:  # the seams really dropped state: at most window + chunk frames were held
        assert held <= tracker.window + chunk < FRAMES
        assert all(m.height == HEIGHT and m.width == WIDTH for m in got[FRAMES - 1].masks)


def test_a_reversed_stream_is_backward_tracking(checkpoint, clip):
    tracker = VideoTracker(checkpoint, torch.device("cpu"), torch.float32, chunk=8)
    expected = whole_clip_logits(tracker, clip, reverse=True)
    got, _ = streamed_logits(tracker, clip, list(range(FRAMES - 1, -1, -1)))
    for frame in range(FRAMES):
        assert torch.equal(got[frame].low, expected[frame] > 0), f"frame {frame}: masks differ"


def test_segment_boxes_leaves_the_tracked_objects_alone(checkpoint, clip):
    tracker = VideoTracker(checkpoint, torch.device("cpu"), torch.float32)
    reference, _ = streamed_logits(tracker, clip, list(range(10)))
    session = tracker.session(WIDTH, HEIGHT)
    session.prompt_boxes(0, [0, 1], BOXES)
    for frame in range(10):
        result = session.track(frame, clip[frame])
        if frame == 4:  # a re-detection on frame 4 in between
            masks, low = session.segment_boxes(4, BOXES[:1])
            assert len(masks) == 1 and low.shape[0] == 1
            assert masks[0].height == HEIGHT and masks[0].width == WIDTH
        assert torch.equal(result.low, reference[frame].low)
    assert session.object_ids == (0, 1)


def test_mask_iou():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    b[0, :2] = True
    b[1, :1] = True
    iou = mask_iou(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0] == 1 and iou[0, 1] == 0.5 and iou[0, 2] == 0 and iou[1].abs().sum() == 0


def test_frames_must_be_rgb_uint8(checkpoint):
    tracker = VideoTracker(checkpoint, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="uint8 RGB"):
        tracker.pixels(np.zeros((4, 4), np.float32))


def test_frames_without_objects_do_not_pile_up(checkpoint, clip):
    tracker = VideoTracker(checkpoint, torch.device("cpu"), torch.float32, chunk=8)
    session = tracker.session(WIDTH, HEIGHT)
    for frame in range(FRAMES):  # nothing detected yet: frames are given, never tracked
        session.add_frame(frame, clip[frame])
    assert session.held_frames() <= tracker.window + tracker.chunk + 1
