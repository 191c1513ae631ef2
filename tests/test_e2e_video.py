"""End-to-end: video projects against the session's real Label Studio 1.23 and one backend (embedded
mode) on the tiny random-weight models plus the tiny SAM 2.1 video tracker (``TRACKER_MODEL``).

H.264 clips made by tests/videoclips.py (320x240, 25 fps, every frame burns its index) are uploaded
to LS like any file; the backend downloads them from LS with its API key. What is checked:

1. Data Manager "Retrieve predictions" stores one prediction per task, made of ``videorectangle``
   tracks LS can show (research/video-protocol.md §1.2-1.6).
2. A TextArea prompt sent through ``interactive-annotating`` (LS's own shape) comes back as tracks.
3. A label click on a drawn box (LS sends every track with that label: the drawn one ``origin:
   "manual"``, a predicted one ``origin: "prediction"``) comes back as the same tracks: the drawn one
   keeps its id, label and keyframe and gains tracked keyframes after it; the predicted one is
   untouched.
4. A prediction accepted as an annotation is exported by LS with its key frames interpolated.
5. A truncated and a garbled clip beside a good one: the good task gets tracks, the bad ones empty
   predictions with the reason in the backend's log, and /predict still answers 200.
6. ``python -m backend prelabel --project ID`` labels a video project, and a second run writes nothing.

The tiny tracker's masks mean nothing (often the whole frame), so the boxes' values are not
checked here, only their form; tests/test_e2e_browser_video.py checks on screen that LS shows a
track's box on the right picture.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lsharness import ML_CALL_TIMEOUT
from tests.test_e2e_label_studio import connect, logs_on_failure
from tests.test_video_http import CONFIG, FPS, KEYS
from tests.videoclips import NOT_MEDIA, clip_bytes, garbled, make_clip, truncated

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
LABELS = {"square", "disc"}
EPS = 1e-6
#: The tracking knobs of the module's backend (and of the bulk CLI in test 6): the detector looks on
#: frames 1 and 26, a drawn box is followed 10 frames, at most 3 tracks per video (the tiny detector
#: finds 5 things everywhere). VIDEO_DEADLINE stays at its default (50 s): on 2 idle cores the
#: retrieve call tracks its 75 frames in a few seconds.
VIDEO_ENV = {"VIDEO_DETECT_EVERY": "25", "VIDEO_TRACK_FRAMES": "10", "VIDEO_MAX_OBJECTS": "3"}
TRACK_FRAMES = int(VIDEO_ENV["VIDEO_TRACK_FRAMES"])
SQUARE = (48, (20, 60), (4, 1))  # side, top-left at index 0, velocity per frame (pixels)
CLIPS = {  # name -> (frames, make_clip options); all 320x240 at 25 fps
    "two-seconds.mp4": (50, {}),
    "one-second-bframes.mp4": (25, {"bframes": True}),
}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Good H.264 clips (CLIPS) and bad ones: the 2 s clip cut at half its bytes (its index, the
    ``moov`` atom, is at the end: nothing opens), the 2 s clip with 4 KiB of noise written over its
    frames (opens, then fails to decode), and text bytes named .mp4."""
    folder = tmp_path_factory.mktemp("e2e-clips")
    paths = {name: make_clip(folder / name, frames=frames, fps=FPS, size=(320, 240), square=SQUARE, **options)
             for name, (frames, options) in CLIPS.items()}
    good = paths["two-seconds.mp4"].read_bytes()
    bad = {"truncated.mp4": truncated(good, 0.5),
           "garbled.mp4": garbled(clip_bytes(frames=50, fps=FPS, size=(320, 240), square=SQUARE, faststart=True),
                                  start=0.3),
           "not-a-video.mp4": NOT_MEDIA[0]}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def video_env(label_studio, tiny_family) -> dict[str, str]:
    """Env of a backend (or the bulk CLI) on the tiny models that reads uploads from the session's LS."""
    return {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
            "TRACKER_MODEL": str(tiny_family("sam2-video")), **VIDEO_ENV}


@pytest.fixture(scope="module")
def backend(start_backend, video_env):
    """The module's one backend (embedded mode)."""
    return start_backend(**video_env)


@pytest.fixture(scope="module")
def retrieved(label_studio, ls, clips, backend) -> dict:
    """A video project with the good clips, connected to the backend, after "Retrieve predictions".
    Returns ``{"project", "ml_id", "frames": {task id: frames of its clip}, "seconds", "log"}`` (the
    backend's log up to then)."""
    project = ls.create_project("e2e video", CONFIG)
    names = list(CLIPS)
    task_ids = ls.import_images(project, [clips[name] for name in names])
    for task_id, name in zip(task_ids, names):
        url = ls.task(task_id)["data"]["video"]
        assert url.startswith(f"/data/upload/{project}/") and url.endswith(name), url
    with logs_on_failure(label_studio, backend):
        ml_id = connect(ls, project, backend, "grounded-sam video")
        started = time.monotonic()
        answer = ls.retrieve_predictions(project)
        seconds = time.monotonic() - started
    print(f"[e2e video] retrieve predictions for {len(task_ids)} video tasks: {seconds:.1f} s, {answer}")
    return {"project": project, "ml_id": ml_id, "seconds": seconds, "log": backend.log_text(),
            "frames": {task_id: CLIPS[name][0] for task_id, name in zip(task_ids, names)}}


# ---------------------------------------------------------------------------- checks
def check_track(track: dict, frames_count: int, labels: set, where: str) -> list[dict]:
    """One ``videorectangle`` result as LS shows and exports it; returns its keyframes."""
    where = f"{where} track {track.get('id')!r}"
    assert track.get("type") == "videorectangle", f"{where}: type {track.get('type')!r}"
    assert (track.get("from_name"), track.get("to_name")) == ("box", "video"), (
        f"{where}: from_name/to_name {track.get('from_name')!r}/{track.get('to_name')!r}, want the "
        "VideoRectangle 'box' on the Video 'video'")
    assert isinstance(track.get("id"), str) and track["id"], f"{where}: no id"
    score = track.get("score")
    assert isinstance(score, (int, float)) and 0 <= score <= 1, f"{where}: score {score!r}"
    value = track.get("value") or {}
    assert isinstance(value.get("labels"), list) and len(value["labels"]) == 1 and value["labels"][0] in labels, (
        f"{where}: labels {value.get('labels')!r}, want one of {sorted(labels)}")
    assert value.get("framesCount") == frames_count, (
        f"{where}: framesCount {value.get('framesCount')!r} != {frames_count}")
    assert math.isclose(value.get("duration", -1), frames_count / FPS, abs_tol=0.05), (
        f"{where}: duration {value.get('duration')!r}, the clip lasts {frames_count / FPS} s")
    sequence = value.get("sequence")
    assert isinstance(sequence, list) and sequence, f"{where}: no keyframes"
    frames = [key.get("frame") for key in sequence]
    assert frames == sorted(set(frames)), f"{where}: keyframes not sorted and unique: {frames}"
    assert all(isinstance(f, int) and 1 <= f <= frames_count for f in frames), (
        f"{where}: keyframes outside 1..{frames_count}: {frames}")
    for key in sequence:
        at = f"{where} frame {key.get('frame')}"
        assert set(key) == KEYS, f"{at}: keys {sorted(key)} != {sorted(KEYS)}"
        assert math.isclose(key["time"], key["frame"] / FPS, abs_tol=EPS), (
            f"{at}: time {key['time']} != frame / frameRate = {key['frame'] / FPS} (what LS writes)")
        for name in ("x", "y", "width", "height"):
            assert isinstance(key[name], (int, float)) and -EPS <= key[name] <= 100 + EPS, f"{at}: {name}={key[name]!r}"
        assert key["x"] + key["width"] <= 100 + EPS and key["y"] + key["height"] <= 100 + EPS, f"{at}: leaves the frame"
        assert key["rotation"] == 0 and isinstance(key["enabled"], bool), f"{at}: {key}"
    assert sequence[-1]["enabled"] is False, f"{where}: the last keyframe is enabled (LS would hold the box to the end)"
    return sequence


def check_tracks(result: list, frames_count: int, labels: set, where: str) -> None:
    assert isinstance(result, list) and result, f"{where}: no tracks: {result!r}"
    ids = [track.get("id") for track in result]
    assert len(set(ids)) == len(ids), f"{where}: repeated track ids {ids}"
    for track in result:
        check_track(track, frames_count, labels, where)


def interpolated_export(sequence: list[dict], frames_count: int) -> dict[int, tuple]:
    """What LS 1.23 exports for one track's keyframes with ``interpolate_key_frames=true``, as
    ``{frame: (x, y, width, height, auto)}``: every keyframe as stored, and every frame after an
    enabled keyframe up to the next keyframe (up to ``framesCount`` after the last one) as a linear
    interpolation marked ``"auto": true``; nothing after a disabled keyframe (a gap)."""
    keys = sorted(sequence, key=lambda k: k["frame"])
    out = {}
    for i, a in enumerate(keys):
        out[a["frame"]] = (a["x"], a["y"], a["width"], a["height"], False)
        if not a["enabled"]:
            continue
        b = keys[i + 1] if i + 1 < len(keys) else None
        end = b["frame"] if b else frames_count + 1
        for frame in range(a["frame"] + 1, end):
            t = (frame - a["frame"]) / (b["frame"] - a["frame"]) if b else 0.0
            out[frame] = tuple(a[k] + (b[k] - a[k]) * t if b else a[k] for k in ("x", "y", "width", "height")) + (True,)
    return out


def predict_statuses(log: str) -> list[str]:
    """The HTTP statuses of the backend's /predict answers, from werkzeug's access log lines."""
    return re.findall(r'"POST /predict HTTP/1\.[01]" (\d{3})', log)


# ---------------------------------------------------------------------------- tests
def test_retrieve_predictions_stores_one_track_prediction_per_task(label_studio, ls, backend, retrieved):
    with logs_on_failure(label_studio, backend):
        for task_id, frames in retrieved["frames"].items():
            predictions = ls.predictions(task_id)
            assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions stored, want 1"
            prediction = predictions[0]
            assert prediction.get("model_version"), prediction
            check_tracks(prediction["result"], frames, LABELS, f"retrieve task {task_id} ({frames} frames)")
            print(f"[e2e video] task {task_id}: {len(prediction['result'])} tracks, keyframes "
                  f"{[[k['frame'] for k in t['value']['sequence']] for t in prediction['result']]}")
        log = retrieved["log"]
        assert "empty prediction" not in log and "VIDEO_DEADLINE" not in log, log[-3000:]
        assert predict_statuses(log) == ["200"], f"/predict answers: {predict_statuses(log)}"


def test_text_prompt_through_interactive_annotating(label_studio, ls, backend, retrieved):
    """LS 1.23's TextArea ``rows="1"`` + Add: the context holds the textarea result, exactly so."""
    task_id = next(t for t, frames in retrieved["frames"].items() if frames == 25)
    context = {"result": [{"value": {"text": ["disc"]}, "id": "Xq7pP2rT1v", "from_name": "prompt",
                           "to_name": "video", "type": "textarea", "origin": "manual"}]}
    with logs_on_failure(label_studio, backend):
        started = time.monotonic()
        answer = ls.interactive_annotating(retrieved["ml_id"], task_id, context)
        print(f"[e2e video] prompt 'disc' on a 25-frame task: {time.monotonic() - started:.1f} s")
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), str(answer)[:2000]
        check_tracks(answer["data"]["result"], 25, {"disc"}, f"prompt 'disc' task {task_id}")
        assert answer["data"].get("model_version"), answer["data"]
        assert len(ls.predictions(task_id)) == 1, "an interactive answer was stored"


def test_label_click_on_a_drawn_box_tracks_it_and_leaves_predicted_tracks_alone(label_studio, ls, backend,
                                                                              retrieved):
    """What LS 1.23 sends when the annotator selects a box drawn at frame 10 and clicks a label:
    every videorectangle carrying that label (research/video-protocol.md §9)."""
    task_id = next(t for t, frames in retrieved["frames"].items() if frames == 50)
    predicted = dict(ls.predictions(task_id)[0]["result"][0], origin="prediction")
    label = predicted["value"]["labels"][0]
    drawn_key = {"frame": 10, "enabled": True, "rotation": 0, "x": 31.09, "y": 6.67, "width": 21.88,
                 "height": 33.33, "time": 0.4}
    drawn = {"id": "Hx3k9Lw2Qa", "type": "videorectangle", "from_name": "box", "to_name": "video",
             "origin": "manual", "value": {"labels": [label], "framesCount": 50, "duration": 2,
                                           "sequence": [drawn_key]}}
    with logs_on_failure(label_studio, backend):
        answer = ls.interactive_annotating(retrieved["ml_id"], task_id, {"result": [predicted, drawn]})
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), str(answer)[:2000]
        result = answer["data"]["result"]
        by_id = {track.get("id"): track for track in result}
        assert set(by_id) == {drawn["id"], predicted["id"]}, (
            f"the answer's tracks {sorted(by_id)} are not the context's {[drawn['id'], predicted['id']]}: "
            f"{json.dumps(answer)[:2000]}")
        check_tracks(result, 50, {label}, f"label click task {task_id}")

        sequence = by_id[drawn["id"]]["value"]["sequence"]
        assert by_id[drawn["id"]]["value"]["labels"] == [label]
        assert sequence[0] == drawn_key, f"the drawn keyframe changed: {sequence[0]} != {drawn_key}"
        tracked = [key["frame"] for key in sequence[1:]]
        assert tracked and all(10 < f <= 10 + TRACK_FRAMES for f in tracked), (
            f"tracked keyframes {tracked}: want some, after frame 10 and at most VIDEO_TRACK_FRAMES={TRACK_FRAMES} on")

        returned = by_id[predicted["id"]]
        assert returned["value"]["sequence"] == predicted["value"]["sequence"], "the predicted track was changed"
        assert returned["value"]["labels"] == predicted["value"]["labels"]
        print(f"[e2e video] label click: drawn track keyframes {[k['frame'] for k in sequence]}, "
              f"predicted track returned untouched")


def test_accepted_prediction_is_exported_with_interpolated_frames(label_studio, ls, backend, retrieved):
    """An annotation made of a prediction's result (what accepting it in the editor stores), then
    LS's JSON export with ``interpolate_key_frames=true``.

    What LS 1.23 exports (label_studio/data_export/serializers.py → label-studio-sdk's
    ``extract_key_frames``): each videorectangle keeps its id, labels, framesCount and duration, and
    its ``sequence`` becomes one entry per frame of every enabled segment: the stored keyframes as
    they are, plus, after each ``enabled: true`` keyframe, every frame up to the next keyframe as a
    linear interpolation of x, y, width, height and rotation with ``"auto": true`` and ``time``
    rounded to 0.01 s (after an enabled *last* keyframe it would fill up to ``framesCount``).
    After an ``enabled: false`` keyframe nothing is filled: the gap stays empty. Without the flag
    the export holds the keyframes only."""
    task_id = next(t for t, frames in retrieved["frames"].items() if frames == 50)
    project = retrieved["project"]
    prediction = ls.predictions(task_id)[0]
    with logs_on_failure(label_studio, backend):
        annotation = ls.post(f"/api/tasks/{task_id}/annotations", json={
            "result": prediction["result"], "parent_prediction": prediction["id"], "lead_time": 1.5})
        stored = ls.get(f"/api/annotations/{annotation['id']}")
        assert stored["result"] == prediction["result"], "LS changed the accepted tracks when it stored them"

        def export(interpolate: bool) -> dict:
            response = ls.request("GET", f"/api/projects/{project}/export", params={
                "exportType": "JSON", "interpolate_key_frames": str(interpolate).lower()})
            tasks = response.json()
            assert [t["id"] for t in tasks] == [task_id], f"exported tasks {[t['id'] for t in tasks]}"
            (annotation_json,) = tasks[0]["annotations"]
            return {track["id"]: track for track in annotation_json["result"]}

        plain, full = export(False), export(True)
        assert set(plain) == set(full) == {track["id"] for track in prediction["result"]}
        for track in prediction["result"]:
            where = f"export of track {track['id']}"
            assert plain[track["id"]]["value"]["sequence"] == track["value"]["sequence"], f"{where}: keyframes differ"
            exported = full[track["id"]]["value"]
            assert exported["labels"] == track["value"]["labels"] and exported["framesCount"] == 50
            frames = [key["frame"] for key in exported["sequence"]]
            assert frames == sorted(set(frames)), f"{where}: frames not sorted and unique: {frames}"
            want = interpolated_export(track["value"]["sequence"], 50)
            assert set(frames) == set(want), (
                f"{where}: exported frames {frames} != one per frame of each enabled segment {sorted(want)}")
            for key in exported["sequence"]:
                *box, auto = want[key["frame"]]
                got = [key["x"], key["y"], key["width"], key["height"]]
                assert all(math.isclose(g, w, abs_tol=1e-6) for g, w in zip(got, box)), (
                    f"{where} frame {key['frame']}: {got} != linear interpolation {box}")
                assert key.get("auto", False) is auto, f"{where} frame {key['frame']}: auto={key.get('auto')!r}"
            print(f"[e2e video] {where}: {len(track['value']['sequence'])} keyframes -> {len(frames)} frames")


def test_corrupt_clips_fail_alone(label_studio, ls, clips, backend):
    project = ls.create_project("e2e video: corrupt clips", CONFIG)
    names = ["one-second-bframes.mp4", "truncated.mp4", "garbled.mp4", "not-a-video.mp4"]
    task_ids = dict(zip(names, ls.import_images(project, [clips[name] for name in names])))
    log_start = len(backend.log_text())
    with logs_on_failure(label_studio, backend):
        connect(ls, project, backend, "grounded-sam video (corrupt)")
        ls.retrieve_predictions(project)
        log = backend.log_text()[log_start:]
        assert predict_statuses(log) == ["200"], f"/predict answers: {predict_statuses(log)}\n{log[-3000:]}"
        (good,) = ls.predictions(task_ids["one-second-bframes.mp4"])
        check_tracks(good["result"], 25, LABELS, "the good clip beside corrupt ones")
        reasons = {"truncated.mp4": "not a video that can be read", "garbled.mp4": "could not be decoded",
                   "not-a-video.mp4": "not a video that can be read"}
        for name, reason in reasons.items():
            task_id = task_ids[name]
            predictions = ls.predictions(task_id)
            assert all(not p["result"] for p in predictions) and len(predictions) <= 1, (
                f"{name} (task {task_id}): {predictions}")
            line = re.search(rf"task {task_id}: empty prediction: (.*)", log)
            assert line and reason in line.group(1) and "re-encode" in line.group(1), (
                f"{name} (task {task_id}): no log line naming the reason ({reason!r}):\n{log[-3000:]}")
            print(f"[e2e video] {name}: {line.group(0)}")


def test_bulk_prelabel_cli_labels_a_video_project_once(label_studio, ls, clips, tiny_env, video_env):
    project = ls.create_project("e2e video: bulk", CONFIG)
    task_ids = ls.import_images(project, [clips["one-second-bframes.mp4"]] * 2)
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "ALLOW_PRIVATE_URLS"}}
    env.update(tiny_env, **video_env, LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")

    def run() -> str:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=ML_CALL_TIMEOUT)
        output = done.stdout + done.stderr
        print(f"[e2e video] prelabel --project {project}: {time.monotonic() - started:.1f} s, "
              f"{output.strip().splitlines()[-1]}")
        assert done.returncode == 0, output[-4000:]
        assert label_studio.legacy_token not in output
        return output

    with logs_on_failure(label_studio):
        output = run()
        assert "2 done, 0 failed of 2" in output, output[-3000:]
        first = {}
        for task_id in task_ids:
            (prediction,) = ls.predictions(task_id)
            check_tracks(prediction["result"], 25, LABELS, f"bulk task {task_id}")
            first[task_id] = prediction["id"]

        output = run()
        assert "0 tasks to label, 2 skipped" in output and "0 done, 0 failed of 0" in output, output[-3000:]
        assert {task_id: [p["id"] for p in ls.predictions(task_id)] for task_id in task_ids} == {
            task_id: [prediction_id] for task_id, prediction_id in first.items()}, "the second run wrote again"

