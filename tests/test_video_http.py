"""Video projects through real HTTP: the backend as a subprocess on tiny random-weight models (a
SAM 2.1 video checkpoint from ``make-tiny-models --family sam2-video``), videos served by a local
HTTP server playing LS, H.264 clips made with PyAV (tests/videoclips.py).

What LS 1.23 sends for video (../shared/research/video-protocol.md §9): /predict with no context
(Retrieve predictions, opening a task), a TextArea prompt, and a label click on a drawn box (the
context holds every videorectangle with that label). The answers are checked for what LS needs:
one ``videorectangle`` per track, keyframes sorted and unique within 1..framesCount, all eight keys,
``time = frame / frameRate``, ids of the context's tracks kept, the annotator's keyframes untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import REPO
from tests.imageserver import ImageServer, make_jwt
from tests.videoclips import clip_bytes, garbled, png_bytes, truncated

TOKEN = "video-legacy-token"
FPS = 25
CONFIG = """<View>
  <Video name="video" value="$video" frameRate="25"/>
  <TextArea name="prompt" toName="video" rows="1" maxSubmissions="1" showSubmitButton="true"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="videoLabels" toName="video"><Label value="square"/><Label value="disc"/></Labels>
</View>"""
KEYS = {"frame", "x", "y", "width", "height", "rotation", "enabled", "time"}


@pytest.fixture(scope="module")
def clips():
    good = clip_bytes(frames=50, fps=FPS, size=(160, 120), square=(30, (10, 40), (2, 1)))
    return {"good": good, "long": clip_bytes(frames=300, fps=FPS, size=(160, 120)),
            "truncated": truncated(good, 0.4), "garbled": garbled(good), "png": png_bytes()}


@pytest.fixture(scope="module")
def server(clips):
    server = ImageServer(legacy_token=TOKEN, pat=make_jwt({"token_type": "refresh", "exp": time.time() + 3600})).start()
    for name, data in clips.items():
        server.ls_static(f"/data/upload/1/{name}.mp4", data, "video/mp4")
    yield server
    server.stop()


def video_env(server, tiny_family, **extra) -> dict:
    return {"TRACKER_MODEL": str(tiny_family("sam2-video")), "LABEL_STUDIO_URL": server.base,
            "LABEL_STUDIO_API_KEY": TOKEN, "VIDEO_DETECT_EVERY": "25", "VIDEO_TRACK_FRAMES": "15",
            "PREWARM_TASKS": "0", "VIDEO_DEADLINE": "600", "MAX_DETECTIONS": "2", "VIDEO_MAX_OBJECTS": "3",
            **extra}


@pytest.fixture(scope="module")
def backend(start_backend, server, tiny_family):
    return start_backend(**video_env(server, tiny_family))


def task(task_id: int, name: str) -> dict:
    return {"id": task_id, "data": {"video": f"/data/upload/1/{name}.mp4"}}


def predict(backend, tasks, context=None, timeout=120) -> requests.Response:
    body = {"tasks": tasks, "label_config": CONFIG, "project": "1.1", "params": {"context": context}}
    return requests.post(backend.url + "/predict", json=body, timeout=timeout)


def check_track(result: dict, frames: int) -> list[dict]:
    """The LS-facing shape of one videorectangle; returns its keyframes."""
    assert result["type"] == "videorectangle" and result["from_name"] == "box" and result["to_name"] == "video"
    value = result["value"]
    assert value["framesCount"] == frames and value["duration"] == pytest.approx(frames / FPS, abs=0.05)
    assert value["labels"] and set(value["labels"]) <= {"square", "disc"}
    sequence = value["sequence"]
    numbers = [k["frame"] for k in sequence]
    assert numbers == sorted(set(numbers)) and 1 <= numbers[0] and numbers[-1] <= frames
    for key in sequence:
        assert set(key) == KEYS
        assert key["time"] == pytest.approx(key["frame"] / FPS)
        assert all(0 <= key[k] <= 100 for k in ("x", "y", "width", "height"))
    assert 0 <= result["score"] <= 1
    return sequence


def test_setup_takes_a_video_config(backend):
    response = requests.post(backend.url + "/setup", json={"schema": CONFIG, "project": "1.1"}, timeout=10)
    assert response.status_code == 200, response.text


def test_batch_predict_tracks_good_videos_and_fails_bad_ones_alone(backend):
    tasks = [task(1, "good"), task(2, "truncated"), task(3, "garbled"), task(4, "png"),
             {"id": 5, "data": {"image": "x"}}]
    response = predict(backend, tasks)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 5
    assert results[0]["result"], "the good clip has tracks"
    for result in results[0]["result"]:
        sequence = check_track(result, 50)
        assert sequence[-1]["enabled"] is False  # LS would otherwise keep the box to the video's end
    assert all(r["result"] == [] for r in results[1:])
    log = backend.log_text()
    assert "task 5: empty prediction: task has no video URL in data.video" in log
    for task_id in (2, 3, 4):
        assert f"task {task_id}: empty prediction:" in log
    assert "task 1: video 160x120, 50 frames at 25 fps" in log


def test_a_text_prompt_becomes_tracks(backend):
    context = {"result": [{"value": {"text": ["square"]}, "id": "p1", "from_name": "prompt", "to_name": "video",
                           "type": "textarea", "origin": "manual"}]}
    response = predict(backend, [task(1, "good")], context)
    assert response.status_code == 200
    tracks = response.json()["results"][0]["result"]
    assert tracks and all(t["value"]["labels"] == ["square"] for t in tracks)
    for track in tracks:
        check_track(track, 50)


def test_a_drawn_box_is_tracked_and_keeps_its_id_label_and_keyframes(backend):
    drawn_key = {"frame": 10, "enabled": True, "rotation": 0, "x": 12.5, "y": 30.0, "width": 20.0,
                 "height": 25.0, "time": 0.4}
    drawn = {"id": "drawnBox1", "type": "videorectangle", "from_name": "box", "to_name": "video", "origin": "manual",
             "value": {"labels": ["disc"], "framesCount": 50, "duration": 2, "sequence": [drawn_key]}}
    predicted_keys = [{"frame": 1, "enabled": True, "rotation": 0, "x": 50, "y": 10, "width": 10, "height": 10,
                       "time": 0.04},
                      {"frame": 30, "enabled": False, "rotation": 0, "x": 60, "y": 20, "width": 10, "height": 10,
                       "time": 1.2}]
    predicted = {"id": "predicted1", "type": "videorectangle", "from_name": "box", "to_name": "video",
                 "origin": "prediction", "value": {"labels": ["disc"], "framesCount": 50, "duration": 2,
                                                   "sequence": predicted_keys}}
    response = predict(backend, [task(1, "good")], {"result": [predicted, drawn]})
    assert response.status_code == 200
    by_id = {r["id"]: r for r in response.json()["results"][0]["result"]}
    assert set(by_id) == {"drawnBox1", "predicted1"}
    sequence = check_track(by_id["drawnBox1"], 50)
    assert by_id["drawnBox1"]["value"]["labels"] == ["disc"]
    assert sequence[0] == drawn_key  # the annotator's keyframe, exactly
    later = [k["frame"] for k in sequence[1:]]
    assert later and all(10 < f <= 10 + 15 for f in later)  # VIDEO_TRACK_FRAMES=15
    assert by_id["predicted1"]["value"]["sequence"] == predicted_keys  # not the annotator's: untouched


def test_an_interactive_call_that_asks_for_nothing_gets_empty_predictions(backend):
    response = predict(backend, [task(1, "good")], {"result": []})
    assert response.status_code == 200 and response.json()["results"][0]["result"] == []


def test_bounds_and_the_deadline(start_backend, server, tiny_family):
    limited = start_backend(**video_env(server, tiny_family, VIDEO_DEADLINE="1", MAX_VIDEO_FRAMES="100",
                                        PRELOAD_MODELS="true"))
    response = predict(limited, [task(1, "good")])  # warms the models up under the deadline too
    started = time.monotonic()
    response = predict(limited, [task(1, "long"), task(2, "good")])
    took = time.monotonic() - started
    assert response.status_code == 200
    long, good = response.json()["results"]
    assert long["result"] == []  # 300 frames > MAX_VIDEO_FRAMES=100
    log = limited.log_text()
    assert "MAX_VIDEO_FRAMES" in log
    assert took < 60  # bounded, whatever the machine: the deadline is 1 s, the clip 2 s of video
    small = start_backend(**video_env(server, tiny_family, MAX_VIDEO_MB="0.001"))
    assert predict(small, [task(1, "good")]).json()["results"][0]["result"] == []
    assert "MAX_VIDEO_MB" in small.log_text()


def test_the_deadline_answers_what_it_has(start_backend, server, tiny_family):
    # RETRIEVE_BUDGET=0: VIDEO_DEADLINE alone (within the budget each video of a batch call is a call of
    # its own, with its own deadline, and a video not started in time goes to a bulk run)
    slow = start_backend(**video_env(server, tiny_family, VIDEO_DEADLINE="1", VIDEO_DETECT_EVERY="1",
                                     RETRIEVE_BUDGET="0"))
    response = predict(slow, [task(1, "long"), task(2, "good")])
    assert response.status_code == 200
    first, second = response.json()["results"]
    log = slow.log_text()
    assert "VIDEO_DEADLINE=1 s" in log  # tracking stopped and said so
    assert second["result"] == [] and "task 2: empty prediction: not started" in log
    for track in first["result"]:
        check_track(track, 300)


def test_cli_predict_takes_a_video(tmp_path, tiny_models, tiny_family, clips):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(clips["good"])
    env = {"GROUNDING_DINO_MODEL": str(tiny_models / "grounding-dino"), "SAM_MODEL": str(tiny_models / "sam"),
           "TRACKER_MODEL": str(tiny_family("sam2-video")), "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0",
           "MAX_DETECTIONS": "2", "PATH": "/usr/bin:/bin"}
    for overlay in ("out.mp4", "strip.png"):
        done = subprocess.run([sys.executable, "-m", "backend", "predict", str(clip), "--prompt", "square",
                               "--fps", "25", "--json", str(tmp_path / "out.json"), "--overlay", str(tmp_path / overlay)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / overlay).stat().st_size > 0
    prediction = json.loads((tmp_path / "out.json").read_text())
    for track in prediction["result"]:
        check_track(track, 50)
    from backend.images.video import VideoSource

    assert VideoSource(str(tmp_path / "out.mp4"), fps=25).frames_count == 50


def test_queue_mode_tracks_on_a_worker(start_backend, start_worker, redis_server, server, tiny_family):
    """The web process (no torch) enqueues the video task; a worker downloads, decodes and tracks it."""
    env = video_env(server, tiny_family)
    worker = start_worker(redis_server.url, **env)
    web = start_backend(REDIS_URL=redis_server.url, **env)
    deadline = time.monotonic() + 60
    while requests.get(web.url + "/health", timeout=5).json().get("workers", 0) < 1:
        assert time.monotonic() < deadline, worker.log_text()[-2000:]
        time.sleep(0.5)
    response = predict(web, [task(1, "good"), task(2, "garbled")])
    assert response.status_code == 200, response.text
    good, bad = response.json()["results"]
    assert good["result"] and bad["result"] == []
    for track in good["result"]:
        check_track(track, 50)
    assert "task 1: video 160x120, 50 frames at 25 fps" in worker.log_text()
    assert "task 2: empty prediction:" in worker.log_text()


def test_video_projects_are_not_pre_warmed():
    """Pre-warming encodes image embeddings for the next clicks: a video task has none to encode."""
    from backend.ls.labelconfig import parse_label_config
    from backend.ls.tasks import PredictRequest
    from backend.pipeline.prewarm import after_predict
    from tests.test_http import CONFIG as IMAGE_CONFIG

    def request(config):
        return PredictRequest([{"id": 7, "data": {}}], parse_label_config(config), {"result": []})

    assert after_predict(3, request(CONFIG), 3) is None
    assert after_predict(3, request(IMAGE_CONFIG), 3) is not None
