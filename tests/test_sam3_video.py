"""ENGINE=sam3 on videos: SAM 3's own video model turns text into tracks, streaming with flat memory.

On a tiny random-weight checkpoint (``make-tiny-models --family sam3-video``, biased at build
time so that it detects and keeps objects, see :mod:`backend.engine.tiny_sam3_video`) and a clip
from :mod:`tests.videoclips`:

- the pipeline (``Pipeline(...).video.track_source``) gives one well-formed track per SAM 3 object
  whose phrase maps to a label, never loading the SAM 2.1 tracker;
- its streamed run (frames one at a time, pruned; seen through a spy on the stream) equals
  transformers' whole-clip session (``propagate_in_video_iterator`` over a session holding every
  frame) on the same frames: same object ids, phrases, scores and masks on every frame, exactly
  (float32 on the CPU);
- what the stream holds stays bounded by the model's window however long the clip.

To exercise the pruning of conditioning frames on a short clip, the runs re-condition objects
every 3rd frame instead of every 16th and accept the tiny model's detection/track overlap (~0.45)
as "high IoU" (model attributes, set alike for every run compared).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from backend.cli_video import video_config_for_phrases
from backend.engine.sam3_cvutils import CvUtils
from backend.engine.sam3_video import instances
from backend.errors import ModelLoadError
from backend.images.video import VideoSource
from backend.ls.labelconfig import parse_label_config
from backend.ls.tasks import PredictRequest
from backend.pipeline.predict import Pipeline
from backend.settings import Settings
from tests.videoclips import make_clip

FPS, FRAMES, SIZE = 25, 36, (160, 120)
SQUARE = (24, (10, 30), (2, 1))  # side, top-left at index 0, pixels per frame
PHRASES = ("square", "cat")
LABELS = ["square", "disc"]  # "cat" maps to no label: its objects make no track
RECONDITION_EVERY = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread here: the tiny model gains nothing from more, and on a busy host torch's
    spinning worker threads made these runs 10-20x slower (0.03 s a frame on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "square.mp4", frames=FRAMES, fps=FPS, size=SIZE,
                     square=SQUARE)


@pytest.fixture(scope="module")
def pipeline(tiny_family):
    env = {"ENGINE": "sam3", "SAM3_MODEL": str(tiny_family("sam3-video")), "DEVICE": "cpu",
           "TRACKER_MODEL": "/nonexistent/sam2.1"}  # text prompts must not need SAM 2.1
    pipeline = Pipeline(Settings.from_env(env))
    model = pipeline.video.sam3_video().model
    model.recondition_every_nth_frame, model.high_iou_thresh = RECONDITION_EVERY, 0.3
    return pipeline


@pytest.fixture(scope="module")
def images(clip) -> list[np.ndarray]:
    with VideoSource(clip, fps=FPS) as source:
        return [frame.image for frame in source.frames()]


@pytest.fixture(scope="module")
def run(pipeline, clip):
    """The pipeline's run on the clip: its tracks and frames, and what its stream gave (every frame's
    instances) and held (``held()`` after each frame), seen through a spy on the stream."""
    tracker = pipeline.video.sam3_video()
    found, held = [], []
    open_stream = tracker.stream

    def spied(*args, **kwargs):
        stream = open_stream(*args, **kwargs)
        push, finish = stream.push, stream.finish

        def spy_push(frame, image):
            ready = push(frame, image)
            found.extend(ready)
            held.append(stream.held())
            return ready

        def spy_finish():
            ready = finish()
            found.extend(ready)
            return ready

        stream.push, stream.finish = spy_push, spy_finish
        return stream

    config = parse_label_config(video_config_for_phrases(LABELS, FPS))
    request = PredictRequest(tasks=[{"id": None, "data": {}}], config=config, context=None, bulk=True)
    with pytest.MonkeyPatch.context() as patch, VideoSource(clip, fps=FPS) as source:
        patch.setattr(tracker, "stream", spied)
        tracks, frames = pipeline.video.track_source(source, request, PHRASES, fps=FPS)
    return tracks, frames, found, held


def whole_clip(tracker, images) -> list:
    """transformers' own way: one session holding every frame, text prompts added as
    ``Sam3VideoProcessor.add_text_prompt`` does, ``propagate_in_video_iterator``."""
    video = torch.stack([tracker.pixels(image) for image in images])
    session = Sam3VideoInferenceSession(video=video, video_height=SIZE[1], video_width=SIZE[0], dtype=torch.float32)
    for phrase in PHRASES:
        prompt_id = session.add_prompt(phrase)
        text = tracker.tokenizer(phrase, return_tensors="pt", padding="max_length", max_length=32)
        session.prompt_input_ids[prompt_id], session.prompt_attention_masks[prompt_id] = (
            text.input_ids, text.attention_mask)
    found = []
    with torch.inference_mode():
        for output in tracker.model.propagate_in_video_iterator(session):  # postprocessed as each is yielded
            found.append(instances(output, output.frame_idx + 1, (SIZE[1], SIZE[0]), session.obj_id_to_prompt_id,
                                   session.prompts, session.hotstart_removed_obj_ids))
    assert session.num_frames == len(images)  # it held every frame
    return found


def test_text_prompt_gives_one_track_per_sam3_object(pipeline, run):
    tracks, frames, found, _ = run
    assert frames == FRAMES == tracks.frames_count and (tracks.width, tracks.height) == SIZE
    assert pipeline.video._tracker.model is None and pipeline.video.load_error is None  # SAM 2.1 never loaded

    # What the model gave: per object of a mapped phrase, its box on every frame it reported.
    expected: dict[int, dict[int, tuple | None]] = {}
    for instances_on in found:
        for obj_id, phrase, box in zip(instances_on.ids, instances_on.phrases, instances_on.boxes()):
            if phrase == "square":
                expected.setdefault(obj_id, {})[instances_on.frame] = None if box is None else tuple(box.tolist())
    assert expected, "the tiny model found nothing: rebuild it with make-tiny-models --family sam3-video"
    assert len(tracks.tracks) == len(expected) and len({t.track_id for t in tracks.tracks}) == len(expected)
    for track, (obj_id, boxes) in zip(tracks.tracks, sorted(expected.items())):
        assert track.label == "square" and 0 < track.score <= 1 and track.manual == ()
        got = [b.frame for b in track.boxes]
        assert got == sorted(set(got)) and 1 <= got[0] and got[-1] <= FRAMES
        assert track.boxes[0].box is not None  # a track starts where its object first shows
        for tracked in track.boxes:
            assert tracked.box == boxes.get(tracked.frame)  # None where the model does not report it
            if tracked.box is not None:
                x0, y0, x1, y1 = tracked.box
                assert 0 <= x0 < x1 <= SIZE[0] and 0 <= y0 < y1 <= SIZE[1]
        assert track.visible_frames() == sum(b is not None for b in boxes.values())


def test_streaming_equals_the_whole_clip_session(pipeline, images, run):
    expected = whole_clip(pipeline.video.sam3_video(), images)
    got = run[2]
    assert [f.frame for f in got] == [f.frame for f in expected] == list(range(1, FRAMES + 1))
    assert any(f.ids for f in got)
    for mine, theirs in zip(got, expected):
        assert (mine.ids, mine.phrases) == (theirs.ids, theirs.phrases), f"frame {mine.frame}"
        np.testing.assert_array_equal(mine.scores, theirs.scores)
        for a, b in zip(mine.masks, theirs.masks):
            assert np.array_equal(a.full(), b.full()), f"frame {mine.frame}: masks differ"


def test_what_the_stream_holds_does_not_grow_with_the_video(pipeline, run):
    tracker = pipeline.video.sam3_video()
    held = run[3]
    assert FRAMES > 2 * tracker.window  # transformers' session would hold all of these
    peak = {key: max(h[key] for h in held) for key in held[0]}
    assert peak["frames"] == 0  # a frame's pixels go once it has run
    assert peak["tracked_outputs"] <= tracker.window + 1
    assert peak["cond_outputs"] <= tracker.max_cond_frames + tracker.window // RECONDITION_EVERY + 1
    assert peak["frame_entries"] <= 3 and peak["buffered"] <= tracker.model.hotstart_delay
    # Conditioning frames beyond those keep only their object pointer (what transformers reads of them).
    assert held[-1]["pointer_only"] > 0


def test_a_checkpoint_the_video_model_cannot_run_is_one_load_error(tiny_family):
    narrow = Pipeline(Settings.from_env({"ENGINE": "sam3", "SAM3_MODEL": str(tiny_family("sam3")), "DEVICE": "cpu"}))
    with pytest.raises(ModelLoadError) as first:
        narrow.video.sam3_video()
    assert first.value.setting == "SAM3_MODEL" and "sam3-video" in first.value.reason
    with pytest.raises(ModelLoadError) as again:  # one state: not loaded again
        narrow.video.sam3_video()
    assert again.value is first.value
    missing = Pipeline(Settings.from_env({"ENGINE": "sam3", "SAM3_MODEL": "/nonexistent/sam3", "DEVICE": "cpu"}))
    with pytest.raises(ModelLoadError, match="SAM3_MODEL"):
        missing.video.sam3_video()


def test_nms_and_connected_components_stand_ins():
    ious = torch.tensor([[1.0, 0.5, 0.05], [0.5, 1.0, 0.0], [0.05, 0.0, 1.0]])
    kept = CvUtils.generic_nms(ious, torch.tensor([0.6, 0.9, 0.7]), 0.1)
    assert kept.tolist() == [1, 2]  # 0 overlaps the better 1 by more than 0.1
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    mask[0, 0, 0:2, 0:2] = 1
    mask[0, 0, 2, 2] = 1  # touches the first blob diagonally: 8-connected, one component
    mask[0, 0, 5, 5] = 1
    labels, counts = CvUtils.cc_2d(mask, get_counts=True)
    assert counts[0, 0, 0, 0] == counts[0, 0, 2, 2] == 5 and counts[0, 0, 5, 5] == 1 and counts[0, 0, 4, 4] == 0
    assert labels[0, 0, 0, 0] == labels[0, 0, 2, 2] != labels[0, 0, 5, 5]
