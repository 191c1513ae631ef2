"""The Label Studio side of video projects: the label config (``<Video>``, ``<VideoRectangle>``,
``<Labels>``), the tracks of an interactive context (LS 1.23's shapes, research/video-protocol.md
§9), keyframe thinning and the ``videorectangle`` results, checked against a reference of LS's
own interpolation (§1.4) and against label-studio-sdk's export interpolation."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
from label_studio_sdk._extensions.label_studio_tools.postprocessing.video import extract_key_frames

from backend.ls.labelconfig import LabelConfigError, VideoSpec, parse_label_config
from backend.ls.options import PredictOptions
from backend.ls.selection import SelectDefaults, select_detections
from backend.ls.tasks import RequestTooLarge
from backend.ls.videocontext import VideoContextTooLarge, parse_context_tracks
from backend.ls.videoregions import (VideoResultError, build_video_prediction, percent_box, thin_keyframes,
                                     video_track_result)
from backend.results import CompactMask, Detections, ImageResult
from backend.tracks import Keyframe, Track, TrackedBox, VideoTracks

# The config of the browser session in §9 of the research (LS 1.23.2).
VIDEO = ('<View><Video name="video" value="$video" frameRate="25"/>'
         '<TextArea name="prompt" toName="video" rows="1" maxSubmissions="1" showSubmitButton="true"/>'
         '<VideoRectangle name="box" toName="video"/>'
         '<Labels name="videoLabels" toName="video"><Label value="square"/><Label value="disc"/></Labels></View>')
KEYS = {"frame", "x", "y", "width", "height", "rotation", "enabled", "time"}
W, H = 640, 360


def video_config(frame_rate: str | None = "25", extra: str = "", labels: str = '<Label value="square"/>') -> str:
    rate = "" if frame_rate is None else f' frameRate="{frame_rate}"'
    return (f'<View><Video name="vid" value="$clip"{rate}/><VideoRectangle name="rect" toName="vid"/>'
            f'<Labels name="lab" toName="vid"{extra}>{labels}</Labels></View>')


# ------------------------------------------------------------------------------ label config

def test_video_config_fills_the_image_fields_with_the_video_and_its_rectangle():
    config = parse_label_config(VIDEO)
    assert config.is_video and config.video == VideoSpec(frame_rate="25")
    assert (config.image_name, config.image_value_key, config.prompt_name) == ("video", "video", "prompt")
    assert (config.rectangle.name, config.rectangle.to_name, config.rectangle.labels) == ("box", "video",
                                                                                          ("square", "disc"))
    assert config.brush is None and config.polygon is None and config.labels == ("square", "disc")
    assert config.xml == VIDEO and config.video.fps({"video": "x.mp4"}) == 25.0


def test_video_config_without_a_textarea_has_no_prompt_and_other_names():
    config = parse_label_config(video_config())
    assert (config.image_name, config.image_value_key, config.prompt_name) == ("vid", "clip", None)
    assert config.rectangle.name == "rect" and config.rectangle.to_name == "vid"


@pytest.mark.parametrize("raw, spec, data, fps", [
    ("25", "25", None, 25.0),
    ("29.97", "29.97", None, 29.97),
    ("$fps", "$fps", {"fps": 30}, 30.0),
    ("$fps", "$fps", {"fps": "12.5"}, 12.5),
    ("$fps", "$fps", {}, 24.0),           # the field is missing: LS's default
    ("0.04", "0.04", None, 25.0),         # below 1: LS inverts it
    ("fast", "fast", None, 24.0),         # not a number: LS's default
    (None, "24", None, 24.0),             # no attribute: LS's default
])
def test_frame_rate(raw, spec, data, fps):
    config = parse_label_config(video_config(raw))
    assert config.video.frame_rate == spec and config.video.fps(data) == pytest.approx(fps)


def test_frame_rate_attribute_is_case_insensitive_as_in_ls():
    xml = video_config(None).replace('value="$clip"', 'value="$clip" framerate="25.0"')
    assert parse_label_config(xml).video.fps() == 25.0


def test_predicted_values_and_model_score_thresholds_on_labels():
    labels = ('<Label value="car" predicted_values="automobile, truck" model_score_threshold="0.6"/>'
              '<Label value="person" predicted_values="pedestrian"/>')
    config = parse_label_config(video_config(extra=' model_score_threshold="0.35"', labels=labels))
    assert config.aliases == {"automobile": "car", "truck": "car", "pedestrian": "person"}
    assert config.rectangle.threshold_for("car") == 0.6 and config.rectangle.threshold_for("person") == 0.35
    assert config.map_phrase("truck") == "car" and config.map_phrase("a pedestrian") == "person"
    assert config.default_phrases() == ["car", "person", "automobile", "truck", "pedestrian"]


def test_selection_works_unchanged_on_one_frames_detections():
    labels = ('<Label value="car" predicted_values="truck" model_score_threshold="0.6"/>'
              '<Label value="person" predicted_values="pedestrian"/>')
    config = parse_label_config(video_config(extra=' model_score_threshold="0.35"', labels=labels))
    masks = tuple(CompactMask.from_full(np.ones((4, 4), bool)) for _ in range(4))
    detections = Detections(np.tile(np.array([[0, 0, 4, 4]], np.float32), (4, 1)),
                            np.array([0.5, 0.7, 0.4, 0.3], np.float32), ("truck", "car", "pedestrian", "person"))
    selection = select_detections(ImageResult(4, 4, detections, masks), config, PredictOptions(), SelectDefaults())
    # truck -> car (0.5, not above car's 0.6); pedestrian -> person (0.4 > the Labels' 0.35); person 0.3: below
    assert [(s.label, round(s.score, 2), s.kinds) for s in selection.kept] == [("car", 0.7, ("rectangle",)),
                                                                               ("person", 0.4, ("rectangle",))]


@pytest.mark.parametrize("xml, message", [
    ('<View><Video name="v" value="$video"/><Labels name="l" toName="v"><Label value="a"/></Labels></View>',
     'no <VideoRectangle> on it: add <VideoRectangle name="box" toName="v"/>'),
    ('<View><Video name="v" value="$video"/><VideoRectangle name="r" toName="v"/></View>',
     'has no labels: add <Labels name="videoLabels" toName="v">'),
    ('<View><Video name="v" value="$video"/><VideoRectangle name="r" toName="v"/>'
     '<Labels name="l" toName="v"></Labels></View>', "has no labels"),
    ('<View><Video name="v" value="$video"/><VideoRectangle name="r" toName="v"/>'
     '<Labels name="l" toName="other"><Label value="a"/></Labels><Video name="other" value="$o"/></View>',
     "has no labels"),
    ('<View><Video name="v" value="$video"/><VideoRectangle name="r" toName="v"/>'
     '<Labels name="l" toName="v"><Label value="a" model_score_threshold="high"/></Labels></View>',
     'model_score_threshold="high" on <Label value="a"> of <Labels name="l">'),
    ('<View><Text name="t" value="$text"/></View>', "no <Image> or <Video>"),
])
def test_unusable_video_configs_say_what_to_fix(xml, message):
    with pytest.raises(LabelConfigError, match=message.replace("(", r"\(")):
        parse_label_config(xml)


def test_image_configs_are_unchanged_and_win_over_a_video():
    image = ('<View><Image name="img" value="$image"/><RectangleLabels name="r" toName="img">'
             '<Label value="cat"/></RectangleLabels></View>')
    config = parse_label_config(image)
    assert config.video is None and not config.is_video and config.image_name == "img"
    both = image.replace("</View>", '<Video name="v" value="$video"/><VideoRectangle name="b" toName="v"/>'
                                    '<Labels name="l" toName="v"><Label value="dog"/></Labels></View>')
    config = parse_label_config(both)
    assert not config.is_video and config.image_name == "img" and config.labels == ("cat",)


# ------------------------------------------------------------------------------ interactive context

def prediction_track() -> dict:
    """The earlier prediction of §9: origin prediction, several keyframes."""
    sequence = [{"frame": f, "enabled": f != 20, "rotation": 0, "x": 10.0 + f, "y": 20.0, "width": 15.5,
                 "height": 25.0, "time": f / 25} for f in (1, 5, 10, 20)]
    return {"id": "pred-1", "type": "videorectangle", "from_name": "box", "to_name": "video", "origin": "prediction",
            "value": {"labels": ["disc"], "framesCount": 75, "duration": 3, "sequence": sequence}}


def manual_track() -> dict:
    """The drawn box of §9, exactly as LS 1.23.2 sent it."""
    return {"id": "Lq3kX9aB1c", "type": "videorectangle", "from_name": "box", "to_name": "video", "origin": "manual",
            "value": {"labels": ["disc"], "framesCount": 75, "duration": 3,
                      "sequence": [{"frame": 1, "enabled": True, "rotation": 0, "x": 31.09, "y": 6.67,
                                    "width": 21.88, "height": 33.33, "time": 0.04}]}}


def test_label_click_context_of_ls_1_23():
    config = parse_label_config(VIDEO)
    prompt = {"value": {"text": ["square"]}, "id": "t1", "from_name": "prompt", "to_name": "video",
              "type": "textarea", "origin": "manual"}
    tracks = parse_context_tracks({"result": [prediction_track(), manual_track(), prompt]}, config)
    assert [t.track_id for t in tracks] == ["pred-1", "Lq3kX9aB1c"]
    predicted, drawn = tracks
    assert (drawn.label, drawn.origin, drawn.frames_count, drawn.duration) == ("disc", "manual", 75, 3.0)
    assert drawn.keyframes == (Keyframe(frame=1, x=31.09, y=6.67, width=21.88, height=33.33, rotation=0,
                                        enabled=True, time=0.04),)
    assert drawn.keyframes[0].to_json() == manual_track()["value"]["sequence"][0]  # kept exactly
    assert [k.frame for k in predicted.keyframes] == [1, 5, 10, 20] and not predicted.keyframes[-1].enabled
    assert drawn.needs_tracking(max_keyframes=4) and not predicted.needs_tracking(max_keyframes=100)
    assert not drawn.needs_tracking(max_keyframes=0)


def test_no_context_an_image_config_or_no_video_tracks_give_nothing():
    config = parse_label_config(VIDEO)
    image = parse_label_config('<View><Image name="video" value="$image"/><RectangleLabels name="box" '
                               'toName="video"><Label value="a"/></RectangleLabels></View>')
    assert parse_context_tracks(None, config) == ()
    assert parse_context_tracks({"result": "nope"}, config) == ()
    assert parse_context_tracks({"result": [manual_track()]}, image) == ()
    assert parse_context_tracks({"result": []}, config) == ()


def test_missing_origin_time_and_rotation_and_unsorted_keyframes():
    item = manual_track()
    del item["origin"]
    item["value"]["sequence"] = [{"frame": 10, "x": 1, "y": 2, "width": 3, "height": 4, "enabled": False},
                                 {"frame": 2.0, "x": 1, "y": 2, "width": 3, "height": 4, "enabled": True,
                                  "rotation": 15, "time": 0.08}]
    (track,) = parse_context_tracks({"result": [item]}, parse_label_config(VIDEO))
    assert track.origin is None and track.needs_tracking(2)
    assert [k.to_json() for k in track.keyframes] == [
        {"frame": 2, "x": 1, "y": 2, "width": 3, "height": 4, "rotation": 15, "enabled": True, "time": 0.08},
        {"frame": 10, "x": 1, "y": 2, "width": 3, "height": 4, "rotation": 0, "enabled": False, "time": 0.4}]


def _broken(change) -> dict:
    item = manual_track()
    change(item)
    return item


HOSTILE = [
    "not a dict", None, 7, [manual_track()],
    _broken(lambda i: i.update(type="rectanglelabels")),
    _broken(lambda i: i.update(type="VideoRectangle")),
    _broken(lambda i: i.update(to_name="other")),
    _broken(lambda i: i.update(from_name="otherbox")),
    _broken(lambda i: i.pop("id")),
    _broken(lambda i: i.update(id=12)),
    _broken(lambda i: i.update(id="")),
    _broken(lambda i: i.update(id="x" * 10_000)),
    _broken(lambda i: i.update(value=None)),
    _broken(lambda i: i.update(value=[1, 2])),
    _broken(lambda i: i["value"].update(sequence=[])),
    _broken(lambda i: i["value"].update(sequence="frames")),
    _broken(lambda i: i["value"].update(sequence=[None])),
    _broken(lambda i: i["value"]["sequence"][0].update(x=float("nan"))),
    _broken(lambda i: i["value"]["sequence"][0].update(y=float("inf"))),
    _broken(lambda i: i["value"]["sequence"][0].update(width=100.5)),
    _broken(lambda i: i["value"]["sequence"][0].update(height=-1)),
    _broken(lambda i: i["value"]["sequence"][0].update(x="31")),
    _broken(lambda i: i["value"]["sequence"][0].update(x=True)),
    _broken(lambda i: i["value"]["sequence"][0].pop("width")),
    _broken(lambda i: i["value"]["sequence"][0].update(frame=0)),
    _broken(lambda i: i["value"]["sequence"][0].update(frame=1.5)),
    _broken(lambda i: i["value"]["sequence"][0].update(frame="1")),
    _broken(lambda i: i["value"]["sequence"][0].update(enabled="yes")),
    _broken(lambda i: i["value"]["sequence"][0].update(rotation=None)),
    _broken(lambda i: i["value"]["sequence"][0].update(time=float("nan"))),
    _broken(lambda i: i["value"]["sequence"].append(dict(i["value"]["sequence"][0]))),  # two keyframes, one frame
]


def test_hostile_and_malformed_items_are_skipped_without_crashing():
    config = parse_label_config(VIDEO)
    good = manual_track()
    tracks = parse_context_tracks({"result": HOSTILE + [good]}, config)
    assert [t.track_id for t in tracks] == [good["id"]]


def test_odd_but_usable_fields_become_none():
    item = manual_track()
    item["value"].update(labels="disc", framesCount=-3, duration=float("nan"))
    item["origin"] = 5
    (track,) = parse_context_tracks({"result": [item]}, parse_label_config(VIDEO))
    assert (track.label, track.origin, track.frames_count, track.duration) == (None, None, None, None)
    assert track.needs_tracking(1)  # a non-string origin is no origin


def test_context_bounds():
    config = parse_label_config(VIDEO)
    items = [dict(manual_track(), id=f"t{i}") for i in range(5)]
    assert len(parse_context_tracks({"result": items}, config, max_tracks=5)) == 5
    with pytest.raises(VideoContextTooLarge, match="6 video tracks .* at most 5"):
        parse_context_tracks({"result": items + [dict(manual_track(), id="t5")]}, config, max_tracks=5)
    big = manual_track()
    big["value"]["sequence"] = [dict(big["value"]["sequence"][0], frame=f) for f in range(1, 12)]
    with pytest.raises(RequestTooLarge, match="11 keyframes; at most 10"):
        parse_context_tracks({"result": [big]}, config, max_keyframes=10)
    assert issubclass(VideoContextTooLarge, ValueError)
    # items of other types or videos do not count
    other = [dict(manual_track(), to_name="elsewhere") for _ in range(10)]
    assert len(parse_context_tracks({"result": other + items}, config, max_tracks=5)) == 5


# ------------------------------------------------------------------------------ LS's interpolation (reference)

def ls_box(sequence: list[dict], frame: int) -> tuple[float, ...] | None:
    """What LS's editor shows at ``frame`` (research §1.4): the nearest keyframe at or before it
    decides visibility (a disabled one is drawn only at its own frame); the shape is interpolated
    linearly to the next keyframe, held after the last."""
    keys = ("x", "y", "width", "height")
    before = [k for k in sequence if k["frame"] <= frame]
    if not before:
        return None
    prev = before[-1]
    if prev["frame"] == frame:
        return tuple(prev[k] for k in keys)
    if not prev["enabled"]:
        return None
    after = [k for k in sequence if k["frame"] > frame]
    if not after:
        return tuple(prev[k] for k in keys)
    nxt, t = after[0], (frame - prev["frame"]) / (after[0]["frame"] - prev["frame"])
    return tuple(prev[k] + (nxt[k] - prev[k]) * t for k in keys)


def check_reproduces(sequence: list[dict], boxes: list[TrackedBox], frames_count: int, tolerance: float) -> None:
    """Every listed frame: visible iff tracked visible, within ``tolerance`` percent; every frame
    after the track's last listed frame: hidden."""
    listed = {b.frame: b for b in boxes}
    for frame in range(1, frames_count + 1):
        shown = ls_box(sequence, frame)
        if frame in listed:
            expected = percent_box(listed[frame].box, W, H)
            assert (shown is None) == (expected is None), f"frame {frame}: visibility"
            if expected is not None:
                error = max(abs(a - b) for a, b in zip(shown, expected))
                assert error <= tolerance + 1e-9, f"frame {frame}: error {error}"
        elif frame > max(listed):
            assert shown is None, f"frame {frame}: shown after the track ended"


def linear(frames, start=(10, 20, 110, 80), step=(3, 1, 3, 1)) -> list[TrackedBox]:
    return [TrackedBox(f, tuple(float(s + d * f) for s, d in zip(start, step))) for f in frames]


# ------------------------------------------------------------------------------ thinning

def test_linear_motion_collapses_to_two_keyframes_per_segment():
    boxes = linear(range(1, 101))
    assert [b.frame for b in thin_keyframes(boxes, W, H, 0.1)] == [1, 100]
    gapped = linear(range(1, 41)) + [TrackedBox(f, None) for f in range(41, 60)] + linear(range(60, 101))
    assert [b.frame for b in thin_keyframes(gapped, W, H, 0.1)] == [1, 40, 60, 100]
    assert thin_keyframes([], W, H, 0.1) == [] and thin_keyframes([TrackedBox(3, None)], W, H, 0.1) == []


def test_zigzag_keeps_its_corners():
    corners = {1: 0.0, 21: 200.0, 41: 0.0, 61: 200.0, 81: 100.0}
    frames = sorted(corners)
    boxes = []
    for f in range(1, 82):
        i = max(j for j in range(len(frames)) if frames[j] <= f)
        if f == frames[-1]:
            x = corners[f]
        else:
            a, b = frames[i], frames[i + 1]
            x = corners[a] + (corners[b] - corners[a]) * (f - a) / (b - a)
        boxes.append(TrackedBox(f, (x, 50.0, x + 100.0, 150.0)))
    assert [b.frame for b in thin_keyframes(boxes, W, H, 0.5)] == frames


def test_untracked_frames_are_interpolated_across_not_a_gap():
    boxes = linear(range(1, 101, 10))  # a tracker that listed every tenth frame
    kept = thin_keyframes(boxes, W, H, 0.1)
    assert [b.frame for b in kept] == [1, 91]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tolerance", [0.0, 0.25, 2.0])
def test_ls_interpolation_of_thinned_random_tracks_reproduces_every_box(seed, tolerance):
    rng = random.Random(seed)
    frames_count, boxes, x, y, vx, visible = 300, [], 100.0, 100.0, 2.0, True
    for frame in range(1, 281):
        if rng.random() < 0.03:
            visible = not visible
        if rng.random() < 0.05:
            continue  # untracked
        vx += rng.gauss(0, 0.3)  # a smooth motion with a little jitter; it leaves the frame at times
        x, y = x + vx + rng.gauss(0, 0.5), y + rng.gauss(0, 0.5)
        boxes.append(TrackedBox(frame, (x, y, x + 80 + rng.gauss(0, 0.5), y + 60) if visible else None))
    boxes.append(TrackedBox(290, (-50.0, -20.0, 30.0, 40.0)))  # partly outside: clipped
    track = Track("t", "square", 0.8, tuple(boxes))
    result = video_track_result(track, parse_label_config(VIDEO), W, H, 25.0, frames_count, 12.0, tolerance)
    sequence = result["value"]["sequence"]
    assert [k["frame"] for k in sequence] == sorted({k["frame"] for k in sequence})
    check_reproduces(sequence, boxes, frames_count, tolerance)
    if tolerance >= 0.25:
        assert len(sequence) < sum(b.box is not None for b in boxes) / 2


# ------------------------------------------------------------------------------ result JSON

def test_result_json_flags_times_and_counts():
    boxes = (linear(range(1, 31)) + [TrackedBox(31, None)] + linear(range(50, 61)) + [TrackedBox(61, None)]
             + linear(range(70, 76)))
    track = Track("trk_1", "disc", 0.75, tuple(boxes))
    result = video_track_result(track, parse_label_config(VIDEO), W, H, 25.0, 75, 3.0, 0.1)
    assert {k: v for k, v in result.items() if k != "value"} == {
        "id": "trk_1", "from_name": "box", "to_name": "video", "type": "videorectangle", "score": 0.75}
    value = result["value"]
    assert (value["labels"], value["framesCount"], value["duration"]) == (["disc"], 75, 3.0)
    sequence = value["sequence"]
    assert all(set(k) == KEYS for k in sequence)
    assert [(k["frame"], k["enabled"]) for k in sequence] == [(1, True), (30, False), (50, True), (60, False),
                                                              (70, True), (75, False)]
    assert all(k["time"] == pytest.approx(k["frame"] / 25) and k["rotation"] == 0 for k in sequence)
    first = percent_box(boxes[0].box, W, H)
    assert tuple(sequence[0][k] for k in ("x", "y", "width", "height")) == first
    check_reproduces(sequence, boxes, 75, 0.1)


def test_visible_through_the_last_frame_still_ends_disabled():
    track = Track("t", "disc", 1.0, tuple(linear(range(1, 76))))
    sequence = video_track_result(track, parse_label_config(VIDEO), W, H, 25.0, 75, 3.0, 0.1)["value"]["sequence"]
    assert [(k["frame"], k["enabled"]) for k in sequence] == [(1, True), (75, False)]
    assert ls_box(sequence, 75) is not None


def test_frames_outside_the_video_are_dropped():
    boxes = [TrackedBox(0, (1.0, 1.0, 9.0, 9.0))] + linear(range(1, 11)) + linear(range(11, 20), step=(9, 1, 9, 1))
    track = Track("t", "disc", 1.0, tuple(boxes))
    sequence = video_track_result(track, parse_label_config(VIDEO), W, H, 25.0, 12, 0.5, 0.1)["value"]["sequence"]
    assert [k["frame"] for k in sequence][0] == 1 and sequence[-1]["frame"] == 12 and not sequence[-1]["enabled"]


def test_manual_keyframes_are_kept_exactly_and_anchor_the_thinning():
    manual = (Keyframe(frame=1, x=31.09, y=6.67, width=21.88, height=33.33, rotation=0, enabled=True, time=0.04),
              Keyframe(frame=40, x=50, y=10, width=20, height=30, rotation=5, enabled=True, time=1.6))
    boxes = linear(range(1, 81))  # a straight line that the manual keyframe at 40 bends
    track = Track("Lq3kX9aB1c", "disc", 1.0, tuple(boxes), manual=manual)
    result = video_track_result(track, parse_label_config(VIDEO), W, H, 25.0, 75, 3.0, 0.1)
    sequence = result["value"]["sequence"]
    assert result["id"] == "Lq3kX9aB1c"
    assert sequence[0] == manual[0].to_json() and manual[1].to_json() in sequence
    frames = [k["frame"] for k in sequence]
    assert frames == sorted(set(frames)) and frames[-1] == 75 and not sequence[-1]["enabled"]
    # between the keyframes, LS's interpolation still meets every tracked box (but at the manual frames)
    tracked = [b for b in boxes if b.frame not in (1, 40) and b.frame <= 75]
    for box in tracked:
        shown, expected = ls_box(sequence, box.frame), percent_box(box.box, W, H)
        if box.frame in (2, 39, 41):  # the neighbours of a manual keyframe are kept: they are exact
            assert shown == expected
        assert max(abs(a - b) for a, b in zip(shown, expected)) <= 0.1 + 1e-9


def test_a_disabled_manual_keyframe_ends_its_run():
    boxes = linear(range(1, 21))
    x, y, w, h = percent_box(boxes[9].box, W, H)  # on the tracked line, so only the flag needs frame 11
    manual = (Keyframe(frame=10, x=x, y=y, width=w, height=h, enabled=False, time=0.4),)
    track = Track("m", "disc", 1.0, tuple(boxes), manual=manual)
    sequence = video_track_result(track, parse_label_config(VIDEO), W, H, 25.0, 75, 3.0, 0.1)["value"]["sequence"]
    assert [(k["frame"], k["enabled"]) for k in sequence] == [(1, True), (10, False), (11, True), (20, False)]
    check_reproduces(sequence, [b for b in boxes if b.frame != 10], 75, 0.1)


def test_build_video_prediction():
    config = parse_label_config(VIDEO)
    tracks = VideoTracks(W, H, 25.0, 3.0, 75, (
        Track("a", "square", 0.9, tuple(linear(range(1, 11)))),
        Track("gone", "square", 0.1, (TrackedBox(1, None), TrackedBox(2, (5.0, 5.0, 5.0, 9.0)))),  # nothing visible
        Track("b", "disc", 0.5, tuple(linear(range(5, 8)))),
    ))
    prediction = build_video_prediction(tracks, config, "gsam-video-1", 0.1)
    assert [r["id"] for r in prediction["result"]] == ["a", "b"]
    assert prediction["score"] == pytest.approx(0.7) and prediction["model_version"] == "gsam-video-1"
    empty = build_video_prediction(VideoTracks(W, H, 25.0, 3.0, 75, ()), config, "v", 0.1)
    assert empty == {"result": [], "score": 0.0, "model_version": "v"}


@pytest.mark.parametrize("args, message", [
    (dict(tolerance=-1), "tolerance"), (dict(tolerance=math.nan), "tolerance"), (dict(width=0), "frame size"),
    (dict(fps=0), "frame rate"), (dict(frames_count=0), "frames_count"), (dict(duration=math.inf), "duration"),
])
def test_bad_arguments_say_what_to_fix(args, message):
    call = dict(track=Track("t", "disc", 1.0, ()), config=parse_label_config(VIDEO), width=W, height=H, fps=25.0,
                frames_count=75, duration=3.0, tolerance=0.1) | args
    with pytest.raises(VideoResultError, match=message):
        video_track_result(**call)


def test_an_image_config_cannot_take_tracks():
    image = parse_label_config('<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
                               '<Label value="a"/></RectangleLabels></View>')
    with pytest.raises(VideoResultError, match="video label config"):
        video_track_result(Track("t", "a", 1.0, ()), image, W, H, 25.0, 75, 3.0, 0.1)


# ------------------------------------------------------------------------------ label-studio-sdk's export

def test_sdk_export_interpolation_yields_the_tracked_boxes():
    rng = random.Random(7)
    boxes, x = [], 50.0
    for frame in range(1, 121):
        x += rng.gauss(1.5, 2)
        boxes.append(TrackedBox(frame, None if 40 <= frame < 55 else (x, 40.0, x + 90, 130.0)))
    track = Track("t", "disc", 1.0, tuple(boxes))
    result = video_track_result(track, parse_label_config(VIDEO), W, H, 25.0, 150, 6.0, 0.2)
    (exported,) = extract_key_frames([copy.deepcopy(result)])
    per_frame = {k["frame"]: k for k in exported["value"]["sequence"]}
    visible = {b.frame: percent_box(b.box, W, H) for b in boxes if b.box is not None}
    assert set(per_frame) == set(visible)
    for frame, expected in visible.items():
        got = tuple(per_frame[frame][k] for k in ("x", "y", "width", "height"))
        assert max(abs(a - b) for a, b in zip(got, expected)) <= 0.2 + 1e-9, frame
