"""Queue mode with a real redis-server, real worker processes and the web app over real HTTP."""

import base64
import os
import re
import signal
import threading
import time

import dataclasses

import pytest
import redis
import requests

from backend.ls.tasks import PromptLimits, parse_predict_request
from backend.queue import jobs, resident
from backend.queue.client import predict_payload
from backend.queue.transport import GsamJob, UnsafeJobError, function_path
from tests.conftest import RedisServer, free_port
from tests.imageserver import ImageServer, make_jwt
from tests.test_http import CONFIG, body
from tests.test_protocol import png

IMAGES = ["data:image/png;base64," + base64.b64encode(png(w, h)).decode() for w, h in
          [(64, 48), (48, 64), (101, 33)]]


def without_ids(prediction: dict) -> list:
    return [{k: v for k, v in region.items() if k != "id"} for region in prediction["result"]]


def loaded_libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        return maps.read()


def job_naming(job_class: type[GsamJob], func_name: str) -> GsamJob:
    """A job naming ``func_name``, built in memory (``Job.create`` writes nothing to Redis)."""
    return job_class.create(func_name, args=[{}], connection=redis.Redis(port=free_port()))


def test_the_web_process_job_class_runs_nothing_and_a_worker_runs_only_what_it_allows():
    with pytest.raises(UnsafeJobError, match="allowed: none"):
        job_naming(GsamJob, function_path(jobs.predict_job)).func
    allowing = GsamJob.allowing([function_path(jobs.predict_job)])
    assert job_naming(allowing, "backend.queue.jobs.predict_job").func is jobs.predict_job
    for foreign in ("os.system", "backend.queue.jobs.resident_pipeline", "backend.queue.resident.install"):
        with pytest.raises(UnsafeJobError, match="not a job function of this backend"):
            job_naming(allowing, foreign).func
    assert GsamJob.allowed == frozenset()  # allowing() made a new class; the base still allows nothing


def test_resident_pipeline_is_installed_once(monkeypatch):
    monkeypatch.setattr(resident, "_pipeline", None)
    with pytest.raises(RuntimeError, match="python -m backend worker"):
        resident.resident_pipeline()
    first = object()
    resident.install(first)
    resident.install(first)  # the same one again is harmless
    with pytest.raises(RuntimeError, match="already installed"):
        resident.install(object())
    assert resident.resident_pipeline() is first


def test_predict_job_parses_back_the_request_the_client_sent(monkeypatch):
    """Payload out of a parsed request → the worker's parse: the same request, tasks cut to id/data."""
    limits = PromptLimits()
    request = parse_predict_request(body(IMAGES[0], IMAGES[1], prompt="cat"), limits)
    request = dataclasses.replace(request, prompt="dog", tasks=[{**t, "annotations": [{"result": []}]}
                                                                for t in request.tasks])
    shared, tasks = predict_payload(request)
    assert shared == {"label_config": CONFIG, "context": request.context, "prompt": "dog"}
    assert tasks == [{"id": 1, "data": {"image": IMAGES[0]}}, {"id": 2, "data": {"image": IMAGES[1]}}]

    class FakePipeline:
        limits = PromptLimits()

        def predict(self, parsed):
            return [parsed]

    monkeypatch.setattr(resident, "_pipeline", FakePipeline())
    (parsed,) = jobs.predict_job({**shared, "tasks": tasks})
    assert (parsed.tasks, parsed.context, parsed.prompt, parsed.config.xml) == (tasks, request.context, "dog", CONFIG)
    assert parsed.prompt_text() == request.prompt_text() == "cat"


def test_interactive_through_the_queue_equals_embedded(queue_stack, start_backend):
    web, _ = queue_stack
    embedded = start_backend(PRELOAD_MODELS="false")
    payload = body(*IMAGES * 3, prompt="cat . dog")  # 9 tasks: 3 jobs of BATCH_SIZE=4, answered in task order
    queued = requests.post(f"{web.url}/predict", json=payload, timeout=90)
    assert queued.status_code == 200, queued.text
    local = requests.post(f"{embedded.url}/predict", json=payload, timeout=90).json()["results"]
    results = queued.json()["results"]
    assert len(results) == 9 and all(r["result"] for r in results)
    assert [without_ids(r) for r in results] == [without_ids(r) for r in local]


def test_web_process_never_loads_torch(queue_stack):
    web, worker = queue_stack
    requests.post(f"{web.url}/predict", json=body(IMAGES[0]), timeout=90).raise_for_status()
    assert "libtorch" not in loaded_libraries(web.process.pid)
    assert "libtorch" in loaded_libraries(worker.process.pid)  # the check itself works


def test_health_reports_queues_and_workers(queue_stack):
    health = requests.get(f"{queue_stack[0].url}/health", timeout=1).json()
    assert health["mode"] == "queue" and health["redis"] == "ok"
    assert health["workers"] == 1 and health["queues"] == {"interactive.grounded-sam": 0, "prelabel.grounded-sam": 0, "interactive.sam3": 0, "prelabel.sam3": 0}
    assert list(health["engines"]) == ["grounded-sam"] and health["engines"]["grounded-sam"]["workers"] == 1


def test_bad_prompt_is_rejected_before_enqueueing(queue_stack):
    response = requests.post(f"{queue_stack[0].url}/predict", json=body(IMAGES[0], prompt=",".join(f"thing{i}" for i in range(100))), timeout=10)
    assert response.status_code == 400 and "phrases" in response.json()["message"]


def test_no_worker_gives_a_clear_503_naming_the_engine(tmp_path_factory, start_backend):
    lonely = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("lonely")).start()
    try:
        web = start_backend(REDIS_URL=lonely.url, PREDICT_TIMEOUT="2")
        response = requests.post(f"{web.url}/predict", json=body(IMAGES[0]), timeout=30)
        assert response.status_code == 503  # at once: nothing is enqueued for a worker that does not exist
        assert "no live worker serves engine 'grounded-sam'" in response.json()["message"]
        assert "ENGINE=grounded-sam python -m backend worker" in response.json()["message"]
        assert requests.get(f"{web.url}/health", timeout=1).json()["status"] == "DEGRADED"
    finally:
        lonely.stop()


def test_redis_down_health_still_answers_and_predict_is_503(tmp_path_factory, start_backend):
    doomed = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("doomed")).start()
    web = start_backend(REDIS_URL=doomed.url)
    doomed.stop()
    health = requests.get(f"{web.url}/health", timeout=1)
    assert health.status_code == 200
    assert health.json()["status"] == "DEGRADED" and "unreachable" in health.json()["redis"]
    response = requests.post(f"{web.url}/predict", json=body(IMAGES[0]), timeout=30)
    assert response.status_code == 503 and "REDIS_URL" in response.json()["message"]


def test_killed_worker_mid_job_is_redone_by_another(tmp_path_factory, start_worker, start_backend):
    """kill -9 a worker while it downloads a slow image: its job is re-queued and another worker answers."""
    redis_server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("kill")).start()
    slow = ImageServer(legacy_token="t", pat=make_jwt({"exp": time.time() + 60})).start()
    arrived = threading.Event()

    def slow_image(handler, query):
        arrived.set()
        time.sleep(4)
        handler.send_bytes(200, png(40, 30), "image/png")

    slow.route("GET", "/slow.png", slow_image)
    try:
        doomed = start_worker(redis_server.url, ALLOW_PRIVATE_URLS="true")
        web = start_backend(REDIS_URL=redis_server.url, PREDICT_TIMEOUT="90")
        answer = {}
        request = threading.Thread(target=lambda: answer.update(response=requests.post(
            f"{web.url}/predict", json=body(slow.url("/slow.png")), timeout=120)))
        request.start()
        assert arrived.wait(30), "the worker never fetched the image"
        os.killpg(doomed.process.pid, signal.SIGKILL)
        start_worker(redis_server.url, ALLOW_PRIVATE_URLS="true")
        request.join(timeout=120)
        response = answer["response"]
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["result"], "the second worker should have labelled the image"
    finally:
        slow.stop()
        redis_server.stop()


def test_smart_click_through_the_queue_uses_the_workers_cache(queue_stack, metrics_port):
    """Refinement runs where SAM lives: the second click on an image is a cache hit in the worker."""
    web, _ = queue_stack
    click = {"type": "keypointlabels", "to_name": "image", "is_positive": True,
             "value": {"x": 40.0, "y": 50.0, "keypointlabels": ["cat"]}}
    config = CONFIG.replace('<TextArea name="prompt" toName="image"/>',
                            '<KeyPointLabels name="k" toName="image" smart="true"><Label value="cat"/></KeyPointLabels>')
    image = "data:image/png;base64," + base64.b64encode(png(72, 40)).decode()
    before = cache_counters(metrics_port)
    for x in (40.0, 60.0):
        payload = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": config,
                   "params": {"context": {"result": [{**click, "value": {**click["value"], "x": x}}]}}}
        response = requests.post(f"{web.url}/predict", json=payload, timeout=60)
        assert response.status_code == 200 and response.json()["results"][0]["result"], response.text
    after = cache_counters(metrics_port)
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)


def cache_counters(port: int) -> dict:
    """The worker's embedding-cache counters, read from its own /metrics endpoint."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    values = dict(re.findall(r"^gsam_embedding_cache_(hits|misses)_total ([0-9.]+)$", text, re.MULTILINE))
    return {name: float(values[name]) for name in ("hits", "misses")}


def test_worker_stops_on_sigterm_while_redis_is_down(tmp_path_factory, start_worker):
    redis_server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("sigterm")).start()
    worker = start_worker(redis_server.url)
    redis_server.stop()
    deadline = time.monotonic() + 60
    # The worker noticed: its housekeeping, its reconnect loop or RQ's own dequeue loop says so
    # (which one first depends on where the worker was when Redis went away).
    noticed = ("Redis unreachable", "lost Redis", "could not connect to Redis")
    while not any(sign in worker.log_text() for sign in noticed):
        assert time.monotonic() < deadline, worker.log_text()[-2000:]
        time.sleep(0.2)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=15) is not None
