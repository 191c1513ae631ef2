"""The web layer on a stub Backend, over real HTTP: it parses once, never branches on the mode,
maps every error of the interface to its status, and hands bulk requests to ``Backend.runs``.

The stub is named as one: it stands for a mode, so these tests check only the web layer's own
behaviour (the modes have their own tests: test_http, test_queue, test_prelabel, test_bulk).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from backend.ls.engines import check_choice
import requests
from werkzeug.serving import make_server

from backend.bulk.request import DEFAULT_CHUNK, RunRequest
from backend.ls.tasks import PredictRequest, PromptLimits
from backend.metrics import Metrics
from backend.modes.base import MODEL_CLASS, Mode
from backend.modes.projects import MemoryProjectStore
from backend.queue.errors import NoWorkerListening, QueueTimeout, QueueUnavailable
from backend.settings import Settings
from backend.web.app import create_app

FIXTURES = Path(__file__).parent / "fixtures" / "ls-protocol"
CONFIG = ('<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image"/>'
          '<RectangleLabels name="label" toName="image"><Label value="cat"/></RectangleLabels></View>')


@dataclasses.dataclass
class StubStatus:
    id: str

    def to_json(self) -> dict:
        return {"id": self.id, "status": "running"}


class StubRuns:
    def __init__(self):
        self.started: list[RunRequest] = []

    def start(self, request: RunRequest) -> StubStatus:
        self.started.append(request)
        return StubStatus("0123456789abcdef")

    def status(self, run_id: str):
        return StubStatus(run_id) if run_id == "0123456789abcdef" else None

    def cancel(self, run_id: str):
        return self.status(run_id)


class StubBackend:
    """Stands for a mode: records the parsed requests, answers one empty prediction per task or raises."""

    mode = Mode.EMBEDDED
    model_version = "stub-version"
    limits = PromptLimits(max_tasks=3)

    def __init__(self):
        self.metrics = Metrics()
        self.runs = StubRuns()
        self.projects = MemoryProjectStore()  # the real embedded store: the web layer applies project settings
        self.requests: list[PredictRequest] = []
        self.raises: Exception | None = None
        self.prewarmed: list[tuple] = []
        self.warmed: list[tuple] = []

    def predict(self, request: PredictRequest) -> list[dict]:
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises
        return [{"result": [], "score": 0.0, "model_version": self.model_version} for _ in request.tasks]

    def health(self) -> dict:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version, "mode": "stub"}

    def served(self) -> dict[str, list[str]]:
        return {"grounded-sam": [self.model_version]}

    def check_choice(self, options) -> None:  # the real check, against what the stub serves
        check_choice(options, self.served(), self.served(), "the stub serves grounded-sam only")

    def engine_state(self, options) -> dict:
        engine = options.engine or "grounded-sam"
        return {"engine": engine, "engine_served": engine in self.served(), "engines": self.served(),
                "model_version": self.model_version}

    def preload(self) -> None:
        raise AssertionError("create_app(preload=False) must not preload")

    def prewarm(self, project: int, request: PredictRequest) -> None:
        self.prewarmed.append((project, [t["id"] for t in request.tasks]))

    def warm(self, project: int, count: int, after: int | None = None, options=None) -> dict:
        self.warmed.append((project, count, after))
        if self.raises is not None:
            raise self.raises
        return {"encoded": count}


@pytest.fixture()
def served():
    backend = StubBackend()
    settings = Settings(label_studio_url="http://ls.invalid", label_studio_api_key="k",
                        allow_unauthenticated_bulk=True)
    server = make_server("127.0.0.1", 0, create_app(settings, backend=backend), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", backend
    server.shutdown()
    thread.join(timeout=5)


def predict_body(n: int = 1, context: dict | None = None) -> dict:
    return {"tasks": [{"id": i + 1, "data": {"image": "http://images.invalid/a.png"}} for i in range(n)],
            "label_config": CONFIG, "project": "1.1", "params": {"context": context}}


def test_health_and_metrics_come_from_the_backend(served):
    url, _ = served
    assert requests.get(url + "/health", timeout=5).json() == {
        "status": "UP", "model_class": "GroundedSAM", "model_version": "stub-version", "mode": "stub"}
    assert "gsam_http_requests_total" in requests.get(url + "/metrics", timeout=5).text


def test_predict_hands_the_parsed_request_to_the_backend_once(served):
    url, backend = served
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["cat"]}}]}
    response = requests.post(url + "/predict", json=predict_body(2, context), timeout=5)
    assert response.status_code == 200
    assert response.json()["model_version"] == "stub-version" and len(response.json()["results"]) == 2
    (request,) = backend.requests
    assert [t["id"] for t in request.tasks] == [1, 2] and request.prompt_text() == "cat"
    assert request.config.labels == ("cat",)


def test_after_submit_the_backend_is_not_called(served):
    url, backend = served
    response = requests.post(url + "/predict", json=predict_body(1, {"result": []}), timeout=5)
    assert response.status_code == 200 and response.json()["results"][0]["result"] == []
    assert backend.requests == []


@pytest.mark.parametrize("error, status", [(QueueTimeout("no worker answered"), 504),
                                           (QueueUnavailable("Redis is unreachable"), 503)])
def test_queue_errors_of_the_backend_map_to_their_status(served, error, status):
    url, backend = served
    backend.raises = error
    response = requests.post(url + "/predict", json=predict_body(), timeout=5)
    assert response.status_code == status and response.json()["message"] == str(error)


def test_the_backend_limits_bound_the_request(served):
    url, backend = served
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["cat"]}}]}
    response = requests.post(url + "/predict", json=predict_body(4, context), timeout=5)
    assert response.status_code == 413 and "MAX_TASKS_PER_REQUEST" in response.json()["message"]
    assert backend.requests == []
    # "Retrieve predictions" (no context) within RETRIEVE_BUDGET: the first MAX_TASKS_PER_REQUEST tasks
    # now, the rest answered [] and handed to a bulk run over exactly those tasks
    response = requests.post(url + "/predict", json=predict_body(4), timeout=5)
    assert response.status_code == 200
    assert [bool(r) for r in response.json()["results"]] == [True, True, True, False]
    assert [[t["id"] for t in r.tasks] for r in backend.requests] == [[1, 2, 3]]
    (run,) = backend.runs.started
    assert (run.project, run.task_ids) == (1, (4,))


def test_prelabel_gives_the_runs_a_validated_request(served):
    url, backend = served
    response = requests.post(url + "/prelabel", json={"project": 7, "prompt": " cat . dog "}, timeout=5)
    assert response.status_code == 202 and response.json()["id"] == "0123456789abcdef"
    assert backend.runs.started == [RunRequest(project=7, prompt="cat . dog", chunk=DEFAULT_CHUNK)]
    for bad in ({"project": 7, "chunk": 300}, {"project": "7"}, {"project": 7, "model_version": " "}):
        response = requests.post(url + "/prelabel", json=bad, timeout=5)
        assert response.status_code == 400, bad
    assert len(backend.runs.started) == 1


def test_run_routes_ask_the_runs(served):
    url, _ = served
    assert requests.get(url + "/jobs/0123456789abcdef", timeout=5).json()["id"] == "0123456789abcdef"
    assert requests.delete(url + "/jobs/0123456789abcdef", timeout=5).status_code == 200
    assert requests.get(url + "/jobs/fedcba9876543210", timeout=5).status_code == 404
    assert requests.get(url + "/jobs/not-a-run", timeout=5).status_code == 404


def test_warm_route_checks_its_body_and_maps_the_modes_answer(served):
    url, backend = served
    for body in ({}, {"project": "x"}, {"project": 1, "tasks": "3"}, {"project": 1, "tasks": True},
                 {"project": 1, "tasks": 2.5}, {"project": 1, "after": "7"}, {"project": 1, "after": False},
                 [1, 2], {"project": -4}):
        answer = requests.post(url + "/warm", json=body, timeout=10)
        assert answer.status_code == 400, (body, answer.text)
    assert backend.warmed == [], "a refused /warm body must not reach the backend"
    answer = requests.post(url + "/warm", json={"project": 2, "tasks": 4, "after": 10}, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"project": 2, "encoded": 4}
    backend.raises = ValueError("tasks=500: warm between 1 and 100 tasks")
    answer = requests.post(url + "/warm", json={"project": 2, "tasks": 500}, timeout=10)
    assert answer.status_code == 400 and "between 1 and 100" in answer.json()["message"]
    backend.raises = NoWorkerListening("no worker is listening for warm requests")
    answer = requests.post(url + "/warm", json={"project": 2}, timeout=10)
    assert answer.status_code == 503 and "no worker is listening" in answer.json()["message"]


def test_a_one_task_predict_of_a_project_asks_the_mode_to_prewarm(served):
    url, backend = served
    assert requests.post(url + "/predict", json=predict_body(1), timeout=10).status_code == 200
    without_project = {k: v for k, v in predict_body(1).items() if k != "project"}
    assert requests.post(url + "/predict", json=without_project, timeout=10).status_code == 200
    assert backend.prewarmed == [(1, [1])]
