"""A model that cannot be loaded is one clear state: /health DOWN with the reason, /predict 503 with
it, a worker and the CLI exit non-zero with it; never a 500 per request. And model_version names
the families (backend.modelinfo)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from backend.modelinfo import model_version
from backend.settings import EngineKind, Settings
from tests.conftest import REPO

PROMPT_BODY = {
    "tasks": [{"id": 1, "data": {"image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1Pe"
                                           "AAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"}}],
    "label_config": '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
                    '<Label value="cat"/></RectangleLabels><TextArea name="prompt" toName="image"/></View>',
    "params": {"context": {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                                       "value": {"text": ["cat"]}}]}},
}


def broken_settings(tiny_models):
    """(id, env, setting named in the reason, words of the reason) per way of failing to give a model."""
    return [
        ("missing-dir", {"SAM_MODEL": "/nonexistent/sam-checkpoint"}, "SAM_MODEL", "no such directory"),
        ("wrong-family", {"SAM_MODEL": str(tiny_models / "grounding-dino")}, "SAM_MODEL",
         "'grounding-dino' checkpoint, which SAM_MODEL does not take"),
        ("detector-wrong-family", {"GROUNDING_DINO_MODEL": str(tiny_models / "sam")}, "GROUNDING_DINO_MODEL",
         "'sam' checkpoint"),
        ("hub-unreachable", {"SAM_MODEL": "nobody-here/no-such-sam", "HF_HUB_OFFLINE": "1"}, "SAM_MODEL",
         "cannot be downloaded"),
        ("sam3-missing", {"ENGINE": "sam3", "SAM3_MODEL": "/nonexistent/sam3"}, "SAM3_MODEL", "no such directory"),
    ]


# Each case starts a backend process (~10 s on 2 cores): the web test takes three, the worker test
# the SAM 3 one, the CLI test the detector's; families.require_family has unit tests per family.
CASES = ["missing-dir", "wrong-family", "hub-unreachable"]


def case(tiny_models, name):
    return next(c for c in broken_settings(tiny_models) if c[0] == name)


@pytest.mark.parametrize("name", CASES)
def test_unloadable_model_is_health_down_and_503(name, tiny_models, start_backend):
    _, env, setting, words = case(tiny_models, name)
    backend = start_backend(statuses=(200, 503), **env)
    deadline = time.monotonic() + 120
    while True:  # the models load in a thread at start (PRELOAD_MODELS): wait for the outcome
        health = requests.get(f"{backend.url}/health", timeout=10)
        if health.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert health.status_code == 503, health.text
    state = health.json()
    assert state["status"] == "DOWN" and state["reason"].startswith(f"{setting}=") and words in state["reason"], state
    assert setting in state["models"]

    for _ in range(2):  # every request gets the same answer, without a new load attempt
        answer = requests.post(f"{backend.url}/predict", json=PROMPT_BODY, timeout=30)
        assert answer.status_code == 503, answer.text
        assert words in answer.json()["message"] and setting in answer.json()["message"]
    log = backend.log_text()
    assert log.count("the models cannot be loaded") == 1, log[-3000:]
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def run_backend(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


@pytest.mark.parametrize("name", ["sam3-missing"])
def test_worker_with_unloadable_model_exits_non_zero(name, tiny_env, tiny_models):
    _, env, setting, words = case(tiny_models, name)
    # Models load before the worker connects, so no Redis needs to answer on this URL.
    done = run_backend(["worker"], {**tiny_env, **env, "REDIS_URL": "redis://127.0.0.1:9/0"})
    assert done.returncode != 0
    assert f"the models cannot be loaded: {setting}=" in done.stderr and words in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_cli_predict_with_unloadable_model_says_which_setting(tmp_path, tiny_env, tiny_models):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(image)
    _, env, setting, words = case(tiny_models, "detector-wrong-family")
    done = run_backend(["predict", str(image), "--prompt", "cat"], {**tiny_env, **env})
    assert done.returncode == 2 and f"error: {setting}=" in done.stderr and words in done.stderr, done.stderr[-2000:]


def test_model_version_names_family_and_checkpoint(tmp_path, tiny_models):
    assert model_version(Settings()) == "grounding-dino-tiny+sam-vit-huge"
    assert model_version(Settings(sam_model="facebook/sam2.1-hiera-large")) == "grounding-dino-tiny+sam2.1-hiera-large"
    assert model_version(Settings(engine=EngineKind.SAM3)) == "sam3"
    assert model_version(Settings(model_version="mine-v3")) == "mine-v3"
    # A local directory whose name does not say its family gets the family word in front.
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "sam_hq"}')
    dino = tmp_path / "detector"
    dino.mkdir()
    (dino / "config.json").write_text('{"model_type": "mm-grounding-dino"}')
    assert model_version(Settings(grounding_dino_model=str(dino), sam_model=str(checkpoint))) == "mm-detector+hq-checkpoint"
    # ... and none when it does (the tiny dirs are named after their families).
    assert model_version(Settings(grounding_dino_model=str(tiny_models / "grounding-dino"),
                                  sam_model=str(tiny_models / "sam"))) == "grounding-dino+sam"


def test_engine_setting_is_validated():
    from backend.settings import SettingsError

    assert Settings.from_env({"ENGINE": "SAM3"}).engine is EngineKind.SAM3
    assert Settings.from_env({}).engine is EngineKind.GROUNDED_SAM
    with pytest.raises(SettingsError, match="ENGINE='sam4' is not an engine"):
        Settings.from_env({"ENGINE": "sam4"})


def test_queue_health_shows_why_a_worker_cannot_load_its_models(tiny_env, tiny_models, redis_server, start_backend):
    """A worker that cannot load exits (above); queue-mode /health still says why, for a while
    (``gsam:worker-errors``, expiring), and DEGRADED while no worker is live."""
    import redis

    from backend.queue import keys, liveness

    _, env, setting, words = case(tiny_models, "missing-dir")
    done = run_backend(["worker"], {**tiny_env, **env, "REDIS_URL": redis_server.url})
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    web = start_backend(REDIS_URL=redis_server.url)
    health = requests.get(f"{web.url}/health", timeout=5)
    assert health.status_code == 200, health.text
    state = health.json()
    assert state["status"] == "DEGRADED" and state["workers"] == 0, state
    [reason] = state["worker_errors"]
    assert reason.startswith(f"{setting}=") and words in reason, state
    assert reason in state["reason"], state

    connection = redis.Redis.from_url(redis_server.url)
    assert 0 < connection.ttl(keys.WORKER_ERRORS) <= liveness.LOAD_ERROR_TTL_S  # every key expires
    run_backend(["worker"], {**tiny_env, **env, "REDIS_URL": redis_server.url})  # the same reason again:
    assert connection.zcard(keys.WORKER_ERRORS) == 1  # one entry, its expiry pushed back
    liveness.mark_alive(connection, "gsam-test-live")  # another worker serves: UP, the error still shown
    state = requests.get(f"{web.url}/health", timeout=5).json()
    assert state["status"] == "UP" and state["worker_errors"] == [reason] and "reason" not in state, state
    liveness.mark_gone(connection, "gsam-test-live")
    connection.delete(keys.WORKER_ERRORS)
    liveness.record_load_error(connection, "SAM_MODEL='x': gone soon; fix it", ttl_s=0.3)
    assert liveness.load_errors(connection) == ["SAM_MODEL='x': gone soon; fix it"]
    time.sleep(0.5)  # an expired entry is not shown even while the key lives (whole seconds)
    assert requests.get(f"{web.url}/health", timeout=5).json()["worker_errors"] == []


def test_any_exception_of_the_load_is_one_state_health_down_and_503(tiny_settings, caplog):
    """Not only ModelLoadError: whatever the engine factory raises is loaded once, kept as a
    ModelLoadError (its traceback logged once), /health DOWN with it and /predict 503, never a retry."""
    from backend.errors import ModelLoadError
    from backend.modes.embedded import EmbeddedBackend
    from backend.pipeline.predict import Pipeline
    from backend.web.app import create_app

    calls = []

    def factory():
        calls.append(1)
        raise RuntimeError("CUDA error: device-side assert triggered\nsecond line")

    pipeline = Pipeline(tiny_settings, engine_factory=factory)
    with pytest.raises(ModelLoadError) as first:
        pipeline.engine()
    with pytest.raises(ModelLoadError) as second:
        pipeline.engine()
    assert len(calls) == 1 and pipeline.load_error is first.value is second.value
    reason = first.value.reason
    assert reason.startswith("ENGINE='grounded-sam': the models could not be loaded (RuntimeError: CUDA error: "
                             "device-side assert triggered); check GROUNDING_DINO_MODEL, SAM_MODEL"), reason
    assert "second line" not in reason

    client = create_app(tiny_settings, backend=EmbeddedBackend(tiny_settings, pipeline)).test_client()
    health = client.get("/health")
    assert health.status_code == 503 and health.json["status"] == "DOWN" and health.json["reason"] == reason
    for _ in range(2):
        answer = client.post("/predict", json=PROMPT_BODY)
        assert answer.status_code == 503 and reason in answer.json["message"], answer.json
    assert len(calls) == 1
    logged = [r for r in caplog.records if r.getMessage().startswith("the models cannot be loaded")]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the unexpected error's traceback, once

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(ModelLoadError, match="too little memory to load the models; free the device"):
        Pipeline(tiny_settings, engine_factory=out_of_memory).engine()
