"""Per-project settings over real HTTP: ``/setup`` stores and validates ``extra_params``, ``/predict``
and bulk runs apply them, the remembered prompt, ``REMEMBER_PROMPT=false``, ``GET /versions`` and
``GET /projects/<id>/settings``.

Three setups: the web layer on a stub Backend (named as one: it records the parsed requests, so the
options that reach the pipeline are visible) with the real embedded project store; the real embedded
backend on the tiny models (the remembered prompt decides which labels come back); queue mode with
a real redis-server and a real worker (settings in Redis, shared by web processes, keys expire,
options in the job payload). The real-LS test creates an ML backend with ``extra_params`` through
LS's API and checks what ``/setup`` stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis
import requests

from backend.bulk.prelabel import build_request
from backend.bulk.request import RunRequest
from backend.bulk.spec import BulkTask, PrelabelSpec
from backend.ls.options import PredictOptions
from backend.ls.tasks import RequestError
from backend.modes.projects import (PROJECT_TTL_S, MemoryProjectStore, ProjectSettings, RedisProjectStore, for_run,
                                    project_id)
from backend.queue import keys
from backend.queue.transport import fetch_job
from tests.conftest import REPO, RedisServer, free_port, recorded
from tests.test_http import CONFIG, GOOD
from tests.test_web import served  # noqa: F401 - the fixture: test_web's app on its stub Backend

PROMPT_CONTEXT = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                              "value": {"text": ["dog"]}}]}


def predict_body(project="1.1795371121", context=None, n=1, image="http://images.invalid/a.png"):
    return {"tasks": [{"id": i + 1, "data": {"image": image}} for i in range(n)], "label_config": CONFIG,
            "project": project, "params": {"context": context}}


def prompt_context(text: str) -> dict:
    return {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": [text]}}]}


def setup_body(extra_params, project="1.1795371121") -> dict:
    """The recorded LS 1.23 /setup body with this project and ``extra_params``."""
    return {**recorded("setup_request.json")["body"], "schema": CONFIG, "project": project,
            "extra_params": extra_params}


def labels_of(prediction: dict) -> set[str]:
    return {region["value"][region["type"]][0] for region in prediction["result"]}


# ------------------------------------------------------------------------------------- units

@pytest.mark.parametrize("value, expected", [("1.1795371121", 1), ("42", 42), (7, 7), (None, None), ("", None)])
def test_project_id_reads_ls_project_uids(value, expected):
    assert project_id(value) == expected


@pytest.mark.parametrize("value", ["0.1", "-1", "1.2.3", "abc", True, 0, "1" * 70, 1.5, ["1"]])
def test_project_id_refuses_anything_else(value):
    with pytest.raises(RequestError, match="project id"):
        project_id(value)


def test_memory_store_a_new_extra_params_prompt_replaces_the_remembered_one():
    store = MemoryProjectStore()
    store.set_options(1, PredictOptions(prompt="cat"))
    store.remember_prompt(1, "dog")
    assert store.get(1).default_prompt == "dog"
    store.set_options(1, PredictOptions(prompt="cat", box_threshold=0.4))  # same prompt: LS re-sends it
    assert store.get(1) == ProjectSettings(PredictOptions(prompt="cat", box_threshold=0.4), "dog")
    store.set_options(1, PredictOptions(prompt="bird"))  # the admin chose another: it wins
    assert store.get(1).default_prompt == "bird" and store.get(1).remembered_prompt is None
    store.set_options(1, PredictOptions())  # null extra_params: options cleared, no prompt of the admin
    assert store.get(1) == ProjectSettings(PredictOptions(), None)


def test_memory_store_is_bounded_and_expires():
    store = MemoryProjectStore(max_projects=2)
    for project in (1, 2, 3):
        store.remember_prompt(project, f"thing{project}")
    assert store.get(1) is None and store.get(3).remembered_prompt == "thing3"
    stale = MemoryProjectStore(ttl_s=0)
    stale.remember_prompt(1, "cat")
    assert stale.get(1) is None
    with pytest.raises(ValueError, match="at most"):
        store.remember_prompt(1, "x" * 5000)


def test_bulk_runs_carry_the_project_options_to_the_pipeline_request():
    store = MemoryProjectStore()
    store.set_options(5, PredictOptions(box_threshold=0.6, prompt="cat"))
    run = for_run(store, RunRequest(project=5))
    assert run.options == PredictOptions(box_threshold=0.6, prompt="cat") and run.prompt == "cat"
    assert for_run(store, RunRequest(project=5, prompt="dog")).prompt == "dog"  # an explicit prompt wins
    assert for_run(store, RunRequest(project=6)) == RunRequest(project=6)
    spec = PrelabelSpec(project=5, label_config=CONFIG, prompt=run.prompt, model_version="v", options=run.options)
    crossed = PrelabelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # as the chunk job's argument
    assert crossed == spec
    request = build_request(crossed, [BulkTask(id=1, data={"image": GOOD})])
    assert request.options == run.options and request.prompt_text() == "cat"
    old = {k: v for k, v in spec.to_dict().items() if k != "options"}  # a run record written before options
    assert PrelabelSpec.from_dict(old).options == PredictOptions()


# ------------------------------------------------------------------- the web layer, stub Backend

@pytest.fixture()
def app(served, request):
    """test_web's app on its stub Backend, whose ``projects`` becomes the real embedded store
    (``remember`` by param); the app reads ``backend.projects`` on every request."""
    url, backend = served
    backend.projects = MemoryProjectStore(remember=getattr(request, "param", True))
    backend.versions = lambda: ["stub-version"]
    return url, backend


def test_setup_stores_extra_params_as_object_or_json_text(app):
    url, backend = app
    answer = requests.post(url + "/setup", json=setup_body({"box_threshold": 0.5, "outputs": ["brush"]}), timeout=5)
    assert answer.status_code == 200 and answer.json() == {"model_version": "stub-version"}
    settings = requests.get(url + "/projects/1/settings", timeout=5).json()
    assert settings == {"project": 1, "options": {"box_threshold": 0.5, "outputs": ["brush"]},
                        "remembered_prompt": None, "default_prompt": None, "remember_prompt": True,
                        "engine": "grounded-sam", "engine_served": True, "engines": {"grounded-sam": ["stub-version"]},
                        "model_version": "stub-version"}
    text = json.dumps({"text_threshold": 0.2, "prompt": "cat . dog"})  # what LS's form stores: text
    assert requests.post(url + "/setup", json=setup_body(text, project="2.17"), timeout=5).status_code == 200
    assert backend.projects.get(2) == ProjectSettings(PredictOptions(text_threshold=0.2, prompt="cat . dog"))
    assert requests.post(url + "/setup", json=setup_body(None, project="2.17"), timeout=5).status_code == 200
    assert backend.projects.get(2) == ProjectSettings()  # LS sends null when the admin cleared the field
    missing = requests.get(url + "/projects/99/settings", timeout=5)
    assert missing.status_code == 404 and "/setup" in missing.json()["message"]


@pytest.mark.parametrize("extra_params, message", [
    ({"box_threshold": 2}, "box_threshold must be a number in [0, 1]"),
    ({"box_treshold": 0.3}, "unknown keys ['box_treshold']"),
    ('{"box_threshold": ', "extra_params is not valid JSON"),
    ("[" * 200 + "]" * 200, "nests 200 levels"),
    ("x" * 70000, "at most 65536"),
    ([1, 2], "must be a JSON object"),
    ({"prompt": ", ".join(f"thing{i}" for i in range(100))}, "extra_params.prompt: the prompt has 100 phrases"),
])
def test_setup_refuses_bad_extra_params_with_a_message(app, extra_params, message):
    url, backend = app
    answer = requests.post(url + "/setup", json=setup_body(extra_params), timeout=5)
    assert answer.status_code == 400 and message in answer.json()["message"], answer.text
    assert backend.projects.get(1) is None  # nothing stored


@pytest.mark.parametrize("extra_params, message", [
    ({f"k{i}": 0 for i in range(100_000)}, "and 99995 more"),
    ({"outputs": ["x" * 1000] * 20_000}, "extra_params.outputs must be"),
    ({"box_threshold": "9" * 100_000}, "box_threshold must be a number"),
    ({"k" * 100_000: 1}, "unknown keys"),
])
def test_setup_answers_huge_extra_params_with_a_short_message(app, extra_params, message):
    url, backend = app
    answer = requests.post(url + "/setup", json=setup_body(extra_params), timeout=30)
    assert answer.status_code == 400 and message in answer.json()["message"]
    assert len(answer.json()["message"]) < 1000  # never the sent value echoed back whole (nor logged)
    assert backend.projects.get(1) is None


def test_predict_applies_options_and_the_remembered_prompt(app):
    url, backend = app
    requests.post(url + "/setup", json=setup_body({"box_threshold": 0.9}), timeout=5).raise_for_status()
    assert requests.post(url + "/predict", json=predict_body(context=None), timeout=5).status_code == 200
    assert backend.requests[-1].options == PredictOptions(box_threshold=0.9)
    assert backend.requests[-1].prompt_text() is None  # nothing remembered yet: the labels are the prompt

    requests.post(url + "/predict", json=predict_body(context=PROMPT_CONTEXT), timeout=5).raise_for_status()
    requests.post(url + "/predict", json=predict_body(context=None, n=2), timeout=5).raise_for_status()
    assert backend.requests[-1].prompt_text() == "dog" and backend.requests[-1].options.box_threshold == 0.9
    other = requests.post(url + "/predict", json=predict_body(project="3.1", context=None), timeout=5)
    assert other.status_code == 200 and backend.requests[-1].prompt_text() is None  # per project

    calls = len(backend.requests)
    empty = requests.post(url + "/predict", json=predict_body(context={"result": []}), timeout=5)
    assert empty.status_code == 200 and empty.json()["results"][0]["result"] == []
    assert len(backend.requests) == calls  # asks for nothing: the remembered prompt is not used

    blank = requests.post(url + "/predict", json=predict_body(context=prompt_context("  ")), timeout=5)
    assert blank.status_code == 200 and backend.projects.get(1).remembered_prompt == "dog"  # blank is no prompt
    bad = requests.post(url + "/predict", json=predict_body(project="x.1"), timeout=5)
    assert bad.status_code == 400 and "project id" in bad.json()["message"]
    assert requests.get(url + "/projects/1/settings", timeout=5).json()["default_prompt"] == "dog"


@pytest.mark.parametrize("path", ["0", "-1", "1000000000000000000", "9" * 5000, "%00", "1.5", "abc", "1%2F..%2F2"])
def test_project_settings_route_answers_odd_ids_with_404(app, path):
    url, _ = app
    answer = requests.get(f"{url}/projects/{path}/settings", timeout=5)
    assert answer.status_code == 404 and answer.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("app", [False], indirect=True)
def test_remember_prompt_false_never_remembers(app):
    url, backend = app
    requests.post(url + "/setup", json=setup_body({"prompt": "cat"}), timeout=5).raise_for_status()
    requests.post(url + "/predict", json=predict_body(context=PROMPT_CONTEXT), timeout=5).raise_for_status()
    requests.post(url + "/predict", json=predict_body(context=None), timeout=5).raise_for_status()
    assert backend.requests[-1].prompt_text() == "cat"  # extra_params.prompt still applies
    settings = requests.get(url + "/projects/1/settings", timeout=5).json()
    assert settings["remembered_prompt"] is None and settings["remember_prompt"] is False


def test_prelabel_and_versions_use_the_project(app):
    url, backend = app
    requests.post(url + "/setup", json=setup_body({"min_mask_area": 0.01}, project="7.1"), timeout=5)
    requests.post(url + "/predict", json=predict_body(project="7.1", context=PROMPT_CONTEXT), timeout=5)
    assert requests.post(url + "/prelabel", json={"project": 7}, timeout=5).status_code == 202
    assert backend.runs.started[-1] == RunRequest(project=7, prompt="dog", options=PredictOptions(min_mask_area=0.01))
    assert requests.get(url + "/versions", timeout=5).json() == {
        "versions": ["stub-version"], "model_version": "stub-version", "engines": {"grounded-sam": ["stub-version"]}}


# ------------------------------------------------------------------- the real embedded backend

def test_embedded_remembered_prompt_decides_the_labels(start_backend):
    backend = start_backend(PRELOAD_MODELS="false")
    url = backend.url
    assert requests.get(url + "/versions", timeout=5).json() == {
        "versions": ["grounding-dino+sam"], "model_version": "grounding-dino+sam",
        "engines": {"grounded-sam": ["grounding-dino+sam"]}}
    requests.post(url + "/setup", json=setup_body({"prompt": "cat"}), timeout=5).raise_for_status()
    batch = requests.post(url + "/predict", json=predict_body(image=GOOD, n=2), timeout=120).json()["results"]
    assert all(labels_of(p) == {"cat"} for p in batch)  # extra_params.prompt for a task without one
    typed = requests.post(url + "/predict", json=predict_body(image=GOOD, context=PROMPT_CONTEXT), timeout=60)
    assert labels_of(typed.json()["results"][0]) == {"dog"}
    batch = requests.post(url + "/predict", json=predict_body(image=GOOD, n=2), timeout=60).json()["results"]
    assert all(labels_of(p) == {"dog"} for p in batch)  # the annotator's last prompt now
    empty = requests.post(url + "/predict", json=predict_body(image=GOOD, context={"result": []}), timeout=60)
    assert empty.json()["results"][0]["result"] == []
    assert "dog" not in backend.log_text()  # prompts are not logged at INFO


def test_embedded_extra_params_change_what_the_models_answer(start_backend):
    url = start_backend(PRELOAD_MODELS="false").url
    default = requests.post(url + "/predict", json=predict_body(image=GOOD), timeout=120).json()["results"][0]
    kinds = {region["type"] for region in default["result"]}
    assert kinds == {"rectanglelabels", "brushlabels"}
    requests.post(url + "/setup", json=setup_body({"outputs": ["brush"], "max_per_label": 1}),
                  timeout=5).raise_for_status()
    shaped = requests.post(url + "/predict", json=predict_body(image=GOOD), timeout=60).json()["results"][0]
    assert {region["type"] for region in shaped["result"]} == {"brushlabels"}
    labels = [region["value"]["brushlabels"][0] for region in shaped["result"]]
    assert len(labels) == len(set(labels)) < len(default["result"]) // 2  # at most one per label
    requests.post(url + "/setup", json=setup_body({"box_threshold": 1.0}), timeout=5).raise_for_status()
    assert requests.post(url + "/predict", json=predict_body(image=GOOD), timeout=60).json()["results"][0][
        "result"] == []  # no score exceeds 1.0
    requests.post(url + "/setup", json=setup_body(None), timeout=5).raise_for_status()  # cleared
    again = requests.post(url + "/predict", json=predict_body(image=GOOD), timeout=60).json()["results"][0]
    assert len(again["result"]) == len(default["result"])


# ------------------------------------------------------------------- queue mode: Redis + a worker

def test_queue_mode_settings_live_in_redis_and_travel_with_the_jobs(queue_stack, redis_server, start_backend):
    web, _ = queue_stack
    connection = redis.Redis.from_url(redis_server.url)
    options = {"box_threshold": 0.0, "max_detections": 3, "outputs": ["rectangle", "brush"]}  # keeps regions
    requests.post(web.url + "/setup", json=setup_body(options, project="11.5"), timeout=10).raise_for_status()
    typed = requests.post(web.url + "/predict", json=predict_body("11.5", PROMPT_CONTEXT, image=GOOD), timeout=90)
    assert typed.status_code == 200 and labels_of(typed.json()["results"][0]) == {"dog"}
    assert 0 < connection.ttl(keys.project_key(11)) <= PROJECT_TTL_S  # the key expires

    other_web = start_backend(REDIS_URL=redis_server.url)  # another web process sees the same settings
    batch = requests.post(other_web.url + "/predict", json=predict_body("11.5", None, n=2, image=GOOD), timeout=90)
    assert batch.status_code == 200 and all(labels_of(p) == {"dog"} for p in batch.json()["results"])
    assert requests.get(other_web.url + "/projects/11/settings", timeout=5).json()["options"] == options

    payloads = []  # the finished jobs (kept result_ttl seconds): what the worker was given
    for key in connection.scan_iter("rq:job:*"):
        job_id = key.decode().split(":", 2)[2]
        if ":" not in job_id and connection.type(key) == b"hash":
            job = fetch_job(job_id, connection)
            if job.args and isinstance(job.args[0], dict) and "label_config" in job.args[0]:
                payloads.append(job.args[0])
    assert payloads and all(p.get("options") == options for p in payloads)
    assert any(p["context"] is None and p["prompt"] == "dog" for p in payloads)


def test_queue_mode_versions_and_remember_off(queue_stack, redis_server, start_backend):
    web, _ = queue_stack
    assert requests.get(web.url + "/versions", timeout=5).json()["versions"] == ["grounding-dino+sam"]
    other = start_backend(REDIS_URL=redis_server.url, MODEL_VERSION="web-v2", REMEMBER_PROMPT="false")
    assert requests.get(other.url + "/versions", timeout=5).json() == {
        "versions": ["web-v2", "grounding-dino+sam"], "model_version": "web-v2",  # its own, then the workers'
        "engines": {"grounded-sam": ["grounding-dino+sam"]}}
    requests.post(other.url + "/predict", json=predict_body("12.1", PROMPT_CONTEXT, image=GOOD), timeout=90)
    assert redis.Redis.from_url(redis_server.url).exists(keys.project_key(12)) == 0  # nothing remembered


def test_redis_store_refreshes_expiry_and_distrusts_what_it_reads(redis_server):
    connection = redis.Redis.from_url(redis_server.url)
    store = RedisProjectStore(connection, ttl_s=1000)
    store.set_options(21, PredictOptions(prompt="cat"))
    store.remember_prompt(21, "dog")
    connection.expire(keys.project_key(21), 10)
    assert store.get(21) == ProjectSettings(PredictOptions(prompt="cat"), "dog")
    assert 10 < connection.ttl(keys.project_key(21)) <= 1000  # refreshed on use
    connection.hset(keys.project_key(21), mapping={"options": '{"box_threshold": 7}', "prompt": "x" * 9000})
    assert store.get(21) == ProjectSettings()  # validated again: unusable values are ignored
    assert RedisProjectStore(connection, remember=False).get(21).remembered_prompt is None


# ------------------------------------------------------------------- a real Label Studio

@pytest.mark.e2e
def test_label_studio_sends_extra_params_to_setup(label_studio, ls, start_backend):
    project = ls.create_project("projects: extra_params", CONFIG)
    backend = start_backend(PRELOAD_MODELS="false")
    options = {"box_threshold": 0.45, "prompt": "cat"}
    ml_id = ls.connect_ml_backend(project, backend.url, "with extra params", extra_params=options)
    assert ls.ml_backend(ml_id).get("state") == "CO"
    stored = requests.get(f"{backend.url}/projects/{project}/settings", timeout=5).json()
    assert stored["options"] == options and stored["default_prompt"] == "cat"

    # an annotator's prompt becomes the default of "Retrieve predictions" (LS re-sends the same
    # extra_params with every /setup, e.g. on each GET /api/ml/<id>: that keeps the remembered prompt)
    task_ids = ls.import_tasks(project, [{"data": {"image": GOOD}}, {"data": {"image": GOOD}}])
    answer = ls.interactive_annotating(ml_id, task_ids[0], PROMPT_CONTEXT)
    assert labels_of(answer["data"]) == {"dog"}, str(answer)[:500]
    assert ls.ml_backend(ml_id).get("state") == "CO"
    ls.retrieve_predictions(project)
    for task_id in task_ids:
        (stored_prediction,) = ls.predictions(task_id)
        assert labels_of(stored_prediction) == {"dog"}

    refused = ls.request("POST", "/api/ml", expect=(400,), timeout=60,
                         json={"project": project, "url": backend.url, "title": "bad", "extra_params": {"nms": 1}})
    # LS 1.23 shows only the status of /setup ("400 Client Error: BAD REQUEST for url: .../setup",
    # it drops the body); the reason is in the backend's log, and the stored options stay as they were
    assert "400" in refused.text and "/setup" in refused.text
    assert "unknown keys ['nms']" in backend.log_text()
    assert requests.get(f"{backend.url}/projects/{project}/settings", timeout=5).json()["options"] == options


@pytest.mark.e2e
def test_cli_bulk_run_uses_the_prompt_remembered_in_redis(label_studio, ls, start_backend, start_worker, tiny_env,
                                                          tmp_path_factory):
    """Queue mode: an annotator's prompt typed through one web process labels the whole project when an
    admin runs ``python -m backend prelabel`` without --prompt (the CLI reads it from Redis)."""
    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("projects-bulk")).start()
    try:
        ls_env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token}
        start_worker(server.url, **ls_env)
        web = start_backend(REDIS_URL=server.url)
        project = ls.create_project("projects: bulk with the remembered prompt", CONFIG)
        task_ids = ls.import_tasks(project, [{"data": {"image": GOOD}} for _ in range(3)])
        typed = requests.post(web.url + "/predict", json=predict_body(f"{project}.1", PROMPT_CONTEXT, image=GOOD),
                              timeout=90)
        assert typed.status_code == 200, typed.text
        env = {**os.environ, **tiny_env, **ls_env, "REDIS_URL": server.url}
        done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        for task_id in task_ids:
            (prediction,) = ls.predictions(task_id)
            assert labels_of(prediction) == {"dog"}
    finally:
        server.stop()
