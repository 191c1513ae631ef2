"""RETRIEVE_BUDGET (backend/modes/retrieve.py): a batch /predict answers within the budget with what
is done, ``[]`` for the rest, and the rest becomes a bulk run that writes back through the LS API.

The app is the real one (``create_app`` on an embedded backend with the tiny models), called through
Flask's test client; its bulk runs write to the session's real Label Studio. Which tasks cannot be
finished in time is decided by an image host that holds its answers until the test opens a gate
(no timing decides it): the fast tasks are ``data:`` URIs, ready well within the budget.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import threading
import time
from collections import Counter

import pytest
import redis

from backend.bulk.adopt import adopt_orphaned_runs
from backend.bulk.redisstore import RedisRunStore
from backend.bulk.request import MAX_RUN_TASK_IDS, PrelabelError, RunRequest
from backend.bulk.runs import EmbeddedRuns
from backend.bulk.runstore import scope_from_text, scope_to_text
from backend.bulk.spec import PrelabelSpec
from backend.ls.client import LabelStudioApi
from backend.pipeline.predict import Pipeline
from backend.modes.factory import build_backend
from backend.modes.retrieve import NO_CREDENTIALS, Retrieve
from backend.web.app import create_app
from tests.imageserver import ImageServer, make_jwt
from tests.test_http import CONFIG
from tests.test_prelabel import CONFIG as PRELABEL_CONFIG, FakeQueue, assert_one_each, make_project
from tests.test_prelabel import wait_final as wait_run
from tests.test_protocol import png

BUDGET_S = 3.0  # the fast chunk (four tiny data: images on the tiny models) needs a fraction of it
RUN_ID = re.compile(r"deferred to bulk run ([0-9a-f]{16})")


def png_uri(i: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(40 + i, 30 + i)).decode()


def gated_project(ls, gate, title: str, fast: int = 4, slow: int = 8) -> tuple[int, list[int], list[dict]]:
    """An LS project whose first ``fast`` tasks' images load at once and the next ``slow`` ones wait
    for ``gate`` to open: ``(project, task ids, task data)``."""
    project = ls.create_project(title, CONFIG)
    for i in range(slow):
        gate.slow(f"/slow/{project}-{i}.png")
    data = [{"image": png_uri(i)} for i in range(fast)] + [{"image": gate.url(f"/slow/{project}-{i}.png")}
                                                            for i in range(slow)]
    return project, ls.import_tasks(project, [{"data": d} for d in data]), data


def batch_body(project: int, task_ids: list[int], data: list[dict]) -> dict:
    """What LS 1.23 sends for "Retrieve predictions" (tests/fixtures/ls-protocol/predict_batch_request.json)."""
    return {"tasks": [{"id": t, "data": d, "project": project} for t, d in zip(task_ids, data)],
            "label_config": CONFIG, "project": f"{project}.1700000000",
            "params": {"login": None, "password": None, "context": None}}


def is_prediction(entry, model_version: str) -> bool:
    return isinstance(entry, dict) and entry.get("model_version") == model_version and isinstance(entry["result"], list)


def predictions_by_task(ls, task_ids) -> dict[int, Counter]:
    return {t: Counter(p["model_version"] for p in ls.predictions(t)) for t in task_ids}


def wait_final(client, run_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{run_id}").get_json()
        if status["status"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not end: {status}")


def app_on(settings):
    backend = build_backend(settings)
    client = create_app(settings, backend).test_client()
    warm = {"tasks": [{"id": 1, "data": {"image": png_uri(0)}}], "label_config": CONFIG}
    assert client.post("/predict", json=warm).status_code == 200  # loads the models: one task, no budget
    return client, backend


# ---------------------------------------------------------------------------- without Label Studio


def test_run_request_task_ids_are_validated_and_kept_in_order():
    assert RunRequest(project=1, task_ids=[5, 3, 5, 9]).task_ids == (5, 3, 9)
    assert RunRequest(project=1).task_ids is None
    for bad in ([], [0], [-1], [True], ["7"], [1.0], list(range(1, MAX_RUN_TASK_IDS + 2)), 7):
        with pytest.raises(PrelabelError, match="task_ids"):
            RunRequest(project=1, task_ids=bad)
    assert RunRequest.from_json({"project": 2, "task_ids": [4, 2]}).task_ids == (4, 2)


def test_a_run_scope_is_stored_as_ranges():
    ids = [1, 2, 3, 7, 9, 10, 11, 100]
    assert scope_to_text(reversed(ids)) == "1-3,7,9-11,100"
    assert scope_from_text(scope_to_text(ids)) == tuple(ids)
    assert scope_to_text(range(1, 100_001)) == "1-100000"


@pytest.fixture(scope="module")
def no_credentials(tiny_settings):
    settings = dataclasses.replace(tiny_settings, label_studio_url=None, label_studio_api_key=None, redis_url=None,
                                   retrieve_budget=BUDGET_S, max_tasks_per_request=4, prewarm_tasks=0)
    return app_on(settings)


def test_without_credentials_the_budget_does_not_apply_and_the_log_says_why(no_credentials, caplog):
    client, backend = no_credentials
    caplog.set_level(logging.INFO, logger="backend.modes.retrieve")
    data = [{"image": png_uri(i)} for i in range(3)]
    answer = client.post("/predict", json=batch_body(7, [1, 2, 3], data))
    assert answer.status_code == 200
    assert all(is_prediction(p, backend.model_version) for p in answer.get_json()["results"])
    assert NO_CREDENTIALS in caplog.text and "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in caplog.text

    # more than MAX_TASKS_PER_REQUEST: the 413 of before, and the reason the budget cannot take them
    caplog.clear()
    data = [{"image": png_uri(i)} for i in range(6)]
    answer = client.post("/predict", json=batch_body(7, list(range(1, 7)), data))
    assert answer.status_code == 413 and "MAX_TASKS_PER_REQUEST" in answer.get_json()["message"]
    assert NO_CREDENTIALS in caplog.text
    assert backend.metrics.retrieve_deferred_tasks._value.get() == 0


def test_the_budget_is_off_at_zero_and_for_interactive_calls(no_credentials, tiny_settings):
    _, backend = no_credentials
    with_ls = dataclasses.replace(tiny_settings, label_studio_url="http://ls.invalid", label_studio_api_key="k")
    body = batch_body(7, [1, 2], [{"image": png_uri(0)}, {"image": png_uri(1)}])
    request = Retrieve(with_ls, backend).parse(body, 7)
    assert Retrieve(with_ls, backend).applies(request, 7)
    assert not Retrieve(dataclasses.replace(with_ls, retrieve_budget=0.0), backend).applies(request, 7)
    assert not Retrieve(with_ls, backend).applies(request, None)  # no project: no run to write back
    assert not Retrieve(with_ls, backend).applies(dataclasses.replace(request, tasks=request.tasks[:1]), 7)
    assert not Retrieve(with_ls, backend).applies(dataclasses.replace(request, context={"result": []}), 7)
    no_ids = dataclasses.replace(request, tasks=[{"data": t["data"]} for t in request.tasks])
    assert not Retrieve(with_ls, backend).applies(no_ids, 7)


# ---------------------------------------------------------------------------- with Label Studio


@pytest.fixture(scope="module")
def gate():
    """An image host whose ``/slow/...`` images answer only once the test opens the gate."""
    opened = threading.Event()
    server = ImageServer(legacy_token="unused", pat=make_jwt({"exp": int(time.time()) + 3600})).start()
    server.gate = opened

    def slow(path: str) -> None:
        def serve(handler, query):
            opened.wait(60)
            handler.send_bytes(200, png(48, 36), "image/png")

        server.route("GET", path, serve)

    server.slow = slow
    yield server
    opened.set()
    server.stop()


@pytest.fixture(scope="module")
def with_ls(tiny_settings, label_studio):
    settings = dataclasses.replace(
        tiny_settings, label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
        redis_url=None, retrieve_budget=BUDGET_S, max_tasks_per_request=8, prewarm_tasks=0,
        allow_private_urls=True, download_read_timeout=120.0,  # the gated host is on 127.0.0.1
        allow_unauthenticated_bulk=True)  # GET /jobs/<id> without basic auth
    return app_on(settings)


@pytest.mark.e2e
def test_unfinished_tasks_are_answered_empty_and_written_back_by_one_run(ls, gate, with_ls, caplog):
    client, backend = with_ls
    mv = backend.model_version
    caplog.set_level(logging.INFO, logger="backend.modes.retrieve")
    project, ids, data = gated_project(ls, gate, "retrieve budget")
    body = batch_body(project, ids, data)

    # 12 tasks, MAX_TASKS_PER_REQUEST=8: chunks of BATCH_SIZE=4 — the fast chunk is answered, the
    # chunk waiting for the gate is not finished at the deadline, the last 4 are never tried
    results = client.post("/predict", json=body).get_json()["results"]
    assert len(results) == 12
    assert all(is_prediction(p, mv) for p in results[:4]), results[:4]
    assert results[4:] == [[]] * 8
    run_id, = RUN_ID.findall(caplog.text)
    assert backend.runs.store.scope(run_id) == tuple(ids[4:])  # exactly the deferred tasks
    assert client.get(f"/jobs/{run_id}").get_json()["status"] in ("planning", "running")  # blocked on the gate
    assert backend.metrics.retrieve_deferred_tasks._value.get() == 8

    # a second click while the run waits: its tasks are left to it, nothing new is started
    caplog.clear()
    again = client.post("/predict", json=body).get_json()["results"]
    assert all(is_prediction(p, mv) for p in again[:4]) and again[4:] == [[]] * 8
    assert not RUN_ID.findall(caplog.text) and "8 left to the bulk run already labeling them" in caplog.text
    assert backend.metrics.retrieve_deferred_tasks._value.get() == 8
    # so is opening one of them (LS asks for that one task, no context): the run writes its prediction
    assert client.post("/predict", json=batch_body(project, ids[5:6], data[5:6])).get_json()["results"] == [[]]

    gate.gate.set()
    final = wait_final(client, run_id)
    assert (final["status"], final["total"], final["done"], final["failed"]) == ("done", 8, 8, 0), final
    stored = predictions_by_task(ls, ids)
    assert all(stored[t] == Counter({mv: 1}) for t in ids[4:]), stored
    assert all(not stored[t] for t in ids[:4]), stored  # answered in the response: LS (not this test) stores them


@pytest.mark.e2e
def test_a_run_that_cannot_start_leaves_the_rest_empty_never_an_empty_prediction(with_ls, caplog):
    client, backend = with_ls
    caplog.set_level(logging.INFO, logger="backend.modes.retrieve")
    data = [{"image": png_uri(i)} for i in range(10)]
    missing_project = 987654  # LS has no such project: the run cannot read its label config
    answer = client.post("/predict", json=batch_body(missing_project, list(range(1, 11)), data))
    assert answer.status_code == 200
    results = answer.get_json()["results"]
    assert all(is_prediction(p, backend.model_version) for p in results[:8]) and results[8:] == [[], []]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 tasks not labeled within RETRIEVE_BUDGET" in w and "could not start" in w for w in warnings)


# ---------------------------------------------------------------------------- bulk runs over a subset


@pytest.mark.e2e
def test_a_run_over_task_ids_plans_only_them_also_when_adopted(ls, label_studio, tiny_settings, redis_server):
    """``RunRequest.task_ids``: the web process's run (embedded) and a queue-mode run that died while
    planning and was adopted by another process: each labels exactly its subset (the scope is in the
    run's record), skipping tasks that already have a prediction of the version."""
    settings = dataclasses.replace(tiny_settings, label_studio_url=label_studio.url,
                                   label_studio_api_key=label_studio.legacy_token, redis_url=None)
    pipeline = Pipeline(settings)
    mv = pipeline.model_version
    pid, good, poison = make_project(ls, "subset runs", n_good=8, n_poison=1)  # the poison task sits after good[4]

    runs = EmbeddedRuns(settings, pipeline)
    status = wait_run(runs.store, runs.start(RunRequest(project=pid, chunk=2, task_ids=tuple(good[1:4]))).id)
    assert (status.status, status.total, status.done, status.skipped) == ("done", 3, 3, 0), status
    assert_one_each(ls, good[1:4], [], mv)
    assert_one_each(ls, [], good[:1] + good[4:] + poison, mv)

    connection = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    store = RedisRunStore(connection)
    spec = PrelabelSpec(project=pid, label_config=PRELABEL_CONFIG, prompt=None, model_version=mv)
    run_id = store.create(spec, None, chunk=2, scope=good[2:6] + poison)  # answered, then its process died
    assert store.scope(run_id) == tuple(sorted(good[2:6] + poison))
    assert store.take_lease(run_id, "the-dead-web-process", ttl=1.0)
    deadline = time.monotonic() + 10
    while store.lease_holder(run_id) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    with LabelStudioApi(label_studio.url, label_studio.legacy_token) as api:
        fake = FakeQueue(redis_server.url, pipeline, api)
        queue_settings = dataclasses.replace(settings, redis_url=redis_server.url)
        assert run_id in adopt_orphaned_runs(queue_settings, connection, chunks=fake)
        status = wait_run(store, run_id)
        fake.stop.set()
    # good[2:4] had one already (skipped); good[4:6] labeled; the poison task failed alone
    assert (status.status, status.total, status.done, status.failed, status.skipped) == ("done", 3, 2, 1, 2), status
    assert_one_each(ls, good[1:6], poison, mv)
    assert_one_each(ls, [], good[:1] + good[6:], mv)
