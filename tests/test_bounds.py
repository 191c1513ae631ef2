"""Issue 10, bounded work: who may call the bulk routes, per-request caps, empty interactive calls,
hostile JSON, images the models cannot take, and the decoding memory budget.

Servers are real (``start_backend``: ``python _wsgi.py`` on the tiny models); the image URLs point at
a loopback server that records every request, so "no image was fetched" is observed, not assumed.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import pytest
import requests
from PIL import Image

from backend.jsonbounds import MAX_JSON_DEPTH, json_depth
from backend.images.decode import PixelBudget, decode_image
from backend.ls.labelconfig import parse_label_config
from backend.pipeline.predict import Pipeline
from backend.settings import Settings, SettingsError
from backend.ls.tasks import PredictRequest
from tests.imageserver import ImageServer, make_jwt
from tests.test_protocol import png

TOKEN = "bounds-legacy-token-7"
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<TextArea name="prompt" toName="image"/>'
          '<KeyPointLabels name="click" toName="image" smart="true"><Label value="cat"/></KeyPointLabels>'
          '<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>'
          '<BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels></View>')
VERSION = "grounding-dino+sam"
EMPTY = {"result": [], "score": 0.0, "model_version": VERSION}
HOSTILE_JSON = [b"[" * 100_000, b'{"a":' * 50_000, b'{"tasks": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
RUN_ID = re.compile(r"[0-9a-f]{16}")


def data_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def click(x: float = 50.0, y: float = 50.0) -> dict:
    return {"from_name": "click", "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["cat"]}}


def body(urls, context=None, params=True) -> dict:
    payload = {"tasks": [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(urls)],
               "label_config": CONFIG, "project": "1.1"}
    if params:
        payload["params"] = {"login": None, "password": None, "context": context}
    return payload


@pytest.fixture(scope="module")
def recorder():
    """A loopback LS stand-in: serves task images (LS token auth) and one project, records requests."""
    server = ImageServer(legacy_token=TOKEN, pat=make_jwt({"token_type": "refresh", "exp": 2**31})).start()
    for name in ("a", "b", "c"):
        server.ls_static(f"/data/upload/1/{name}.png", png(64, 48))
    for path in ("/api/projects/1", "/api/projects/1/"):
        server.route("GET", path, lambda handler, query: handler.send_json(200, {"id": 1, "label_config": CONFIG}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(start_backend, recorder):
    """No basic auth, no opt-in: the bulk routes are closed; caps lowered so tests stay small."""
    # PREWARM_TASKS=0: a one-task /predict would otherwise list and fetch the next tasks in the
    # background, and those requests would land in the recorder of whichever test runs next.
    # RETRIEVE_BUDGET=0: the caps as they are without it (the budget: tests/test_retrieve.py).
    return start_backend(LABEL_STUDIO_URL=recorder.base, LABEL_STUDIO_API_KEY=TOKEN, PRELOAD_MODELS="false",
                         MAX_TASKS_PER_REQUEST="5", MAX_SMART_PROMPTS="4", PREWARM_TASKS="0", RETRIEVE_BUDGET="0")


@pytest.fixture(scope="module")
def opted_in(start_backend, recorder):
    return start_backend(LABEL_STUDIO_URL=recorder.base, LABEL_STUDIO_API_KEY=TOKEN, PRELOAD_MODELS="false",
                         ALLOW_UNAUTHENTICATED_BULK="true", PREWARM_TASKS="0")


def post(backend, path, payload, **kwargs):
    return requests.post(backend.url + path, json=payload, timeout=60, **kwargs)


def ls_urls(*names: str) -> list[str]:
    return [f"/data/upload/1/{name}.png" for name in names]


# ------------------------------------------------------------------------------ bulk routes and auth

def test_bulk_routes_are_403_without_basic_auth_and_ls_routes_still_answer(plain, recorder):
    recorder.reset()
    for method, path, payload in (("POST", "/prelabel", {"project": 1}), ("GET", "/jobs/0123456789abcdef", None),
                                  ("DELETE", "/jobs/0123456789abcdef", None), ("GET", "/jobs/not-a-run", None)):
        response = requests.request(method, plain.url + path, json=payload, timeout=10)
        assert response.status_code == 403, (method, path, response.text)
        message = response.json()["message"]
        assert "BASIC_AUTH_USER" in message and "ALLOW_UNAUTHENTICATED_BULK" in message
    assert recorder.requests == [], "a refused bulk call must not reach Label Studio"
    assert requests.get(plain.url + "/health", timeout=5).status_code == 200
    assert post(plain, "/setup", {"schema": CONFIG}).status_code == 200
    assert post(plain, "/webhook", {"action": "ANNOTATION_CREATED"}).status_code == 200
    assert post(plain, "/predict", body([data_uri(32, 24)])).status_code == 200


# ------------------------------------------------------------------------------ caps, no image fetched

def test_too_many_tasks_is_413_before_any_image_is_fetched(plain, recorder):
    recorder.reset()
    response = post(plain, "/predict", body(ls_urls("a", "b", "c", "a", "b", "c")))
    assert response.status_code == 413
    assert "6 tasks" in response.json()["message"] and "MAX_TASKS_PER_REQUEST" in response.json()["message"]
    assert recorder.requests == []


def test_smart_tool_caps_answer_without_fetching_images(plain, recorder):
    recorder.reset()
    many = post(plain, "/predict", body(ls_urls("a"), {"result": [click(10 + i, 20) for i in range(5)]}))
    assert many.status_code == 413 and "MAX_SMART_PROMPTS" in many.json()["message"]
    two = post(plain, "/predict", body(ls_urls("a", "b"), {"result": [click()]}))
    assert two.status_code == 400 and "one task" in two.json()["message"]
    assert recorder.requests == [], "a refused smart-tool call must not download or decode any image"
    ok = post(plain, "/predict", body(ls_urls("a"), {"result": [click(10 + i, 20) for i in range(4)]}))
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1
    assert recorder.paths() == ["/data/upload/1/a.png"]


def test_empty_interactive_context_answers_empty_without_fetching(plain, recorder):
    recorder.reset()
    for context in ({"result": []}, {}):
        response = post(plain, "/predict", body(ls_urls("a", "b"), context))
        assert response.status_code == 200, response.text
        assert response.json()["results"] == [EMPTY, EMPTY]
    assert recorder.requests == []
    assert "no prompt and no smart-tool regions" in plain.log_text()


@pytest.mark.parametrize("payload", [body(ls_urls("a", "b"), None), body(ls_urls("a", "b"), params=False)],
                         ids=["context-null", "no-params"])
def test_no_context_keeps_labels_as_the_prompt(plain, recorder, payload):
    recorder.reset()
    response = post(plain, "/predict", payload)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2 and all(r["result"] and r["model_version"] == VERSION for r in results)
    assert {r["value"][r["type"]][0] for r in results[0]["result"]} <= {"cat", "dog"}
    assert sorted(recorder.paths()) == ["/data/upload/1/a.png", "/data/upload/1/b.png"]


# ------------------------------------------------------------------------------ hostile JSON

@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook", "/prelabel"])
def test_hostile_json_nesting_is_400_without_a_traceback(opted_in, path):
    for data in HOSTILE_JSON:
        response = requests.post(opted_in.url + path, data=data, headers={"Content-Type": "application/json"},
                                 timeout=30)
        assert response.status_code == 400, (path, response.text[:300])
        assert response.json()["status"] == "error" and "nests" in response.json()["message"]
    assert requests.get(opted_in.url + "/health", timeout=5).status_code == 200
    log = opted_in.log_text()
    assert "Traceback" not in log and "RecursionError" not in log


def test_nesting_up_to_the_bound_is_accepted(opted_in):
    nested = {"action": "ANNOTATION_CREATED", "deep": 1}
    for _ in range(MAX_JSON_DEPTH - 2):
        nested["deep"] = [nested["deep"]]
    assert post(opted_in, "/webhook", nested).status_code == 200
    nested["deep"] = [[nested["deep"]]]
    assert post(opted_in, "/webhook", nested).status_code == 400


def test_json_depth_of_an_unterminated_string_full_of_escaped_quotes_is_linear():
    # With a closing quote required, each of these million quotes restarted a failing match: hours.
    hostile = b"[[" + b'"' + b'\\"' * 1_000_000
    assert json_depth(hostile) == 2


@pytest.mark.parametrize("text, depth", [
    (b"{}", 1), (b"3", 0), (b"", 0), (b"[[1], [2, [3]]]", 3), (b'{"a": "[[[{{"}', 1), (b'{"a": "\\"[[["}', 1),
    (b'["\\\\", [["]]]"]]]', 3), (b"[" * 100_000, 100_000), (b'{"a":' * 50_000, 50_000),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth


# Runs after the hostile-JSON tests on the same server: its run's planning fails against the
# stand-in LS (no task listing there) and logs that failure.
def test_opt_in_opens_bulk_routes_and_run_ids_are_validated(opted_in, recorder):
    for run_id in ("0123456789abcdef", "nope", "0123456789ABCDEF", "0123456789abcdef0", "0123456789abcde",
                   "%00", "x" * 3000, "gsam:run:0123456789abcdef"):
        for method in ("GET", "DELETE"):
            response = requests.request(method, f"{opted_in.url}/jobs/{run_id}", timeout=10)
            assert response.status_code == 404, (method, run_id, response.text)
            assert response.json()["status"] == "error" and "no bulk run" in response.json()["message"]
    started = post(opted_in, "/prelabel", {"project": 1})
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    assert RUN_ID.fullmatch(run_id)
    status = requests.get(f"{opted_in.url}/jobs/{run_id}", timeout=10)
    assert status.status_code == 200 and status.json()["id"] == run_id
    cancelled = requests.delete(f"{opted_in.url}/jobs/{run_id}", timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["id"] == run_id


# ------------------------------------------------------------------------------ images the models cannot take

@pytest.fixture()
def pipeline(tiny_settings, engine):
    return Pipeline(tiny_settings, engine_factory=lambda: engine)


def request_for(urls, context=None) -> PredictRequest:
    return PredictRequest(tasks=[{"id": i + 1, "data": {"image": url}} for i, url in enumerate(urls)],
                          config=parse_label_config(CONFIG), context=context)


def test_a_sliver_image_fails_alone_in_its_batch(pipeline):
    urls = [data_uri(64, 48), data_uri(4000, 1), data_uri(48, 64), data_uri(1, 3000)]
    outcomes = pipeline.predict_outcomes(request_for(urls))
    assert len(outcomes) == 4
    for good in (outcomes[0], outcomes[2]):
        assert good.error is None and good.prediction["result"]
    for bad, size in ((outcomes[1], "4000x1"), (outcomes[3], "1x3000")):
        assert bad.prediction == {"result": [], "score": 0.0, "model_version": pipeline.model_version}
        assert size in bad.error and "too thin" in bad.error


def test_a_sliver_image_with_smart_clicks_fails_alone(pipeline):
    outcomes = pipeline.predict_outcomes(request_for([data_uri(4000, 1)], {"result": [click()]}))
    assert outcomes[0].prediction["result"] == [] and "too thin" in outcomes[0].error


class FailsOnSize:
    """The real engine, except that ``run`` raises for any batch holding an image of one size:
    an engine failure that no tiny-model image triggers naturally (an OOM, a kernel error)."""

    def __init__(self, engine, size: tuple[int, int]):
        self.engine, self.size, self.batches = engine, size, []
        self.batch_size = engine.batch_size

    def prepare(self, image):
        return self.engine.prepare(image)

    def run(self, images, phrases, keys=None):
        self.batches.append(len(images))
        if any(item.image.size == self.size for item in images):
            raise RuntimeError("injected failure for one image")
        return self.engine.run(images, phrases, keys)


def test_a_failing_batch_is_retried_image_by_image(tiny_settings, engine):
    faulty = FailsOnSize(engine, (30, 20))
    pipeline = Pipeline(tiny_settings, engine_factory=lambda: faulty)
    urls = [data_uri(64, 48), data_uri(30, 20), data_uri(48, 64), data_uri(50, 50)]
    outcomes = pipeline.predict_outcomes(request_for(urls))
    assert faulty.batches == [4, 1, 1, 1, 1], "one batch of 4, then each image alone"
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    assert all(o.prediction["result"] for i, o in enumerate(outcomes) if i != 1)
    assert outcomes[1].prediction["result"] == [] and "injected failure" in outcomes[1].error


# ------------------------------------------------------------------------------ decoding budget

def test_pixel_budget_admits_what_fits_and_waits_for_the_rest():
    budget = PixelBudget(100)
    first = budget.acquire(60)
    assert first == 60 and budget.in_use == 60
    assert budget.acquire(50, timeout=0) is None, "60 + 50 is over a budget of 100"
    second = budget.acquire(40, timeout=0)
    assert second == 40 and budget.in_use == 100 and budget.peak == 100
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(50)))
    waiter.start()
    budget.release(first)
    waiter.join(timeout=30)
    assert got == [50] and budget.in_use == 90
    budget.release(second)
    budget.release(got[0])
    assert budget.in_use == 0


def test_pixel_budget_lets_an_oversized_image_decode_alone():
    budget = PixelBudget(100)
    small = budget.acquire(10)
    assert budget.acquire(1000, timeout=0) is None, "an oversized image waits for an empty budget"
    budget.release(small)
    charge = budget.acquire(1000, timeout=0)
    assert charge == 100 and budget.acquire(1, timeout=0) is None
    budget.release(charge)
    budget = PixelBudget(2000)
    assert budget.acquire(1000, timeout=0) == 1000
    with pytest.raises(ValueError):
        PixelBudget(0)


def test_decoding_threads_stay_within_the_budget():
    width, height = 300, 200
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buffer, "PNG")
    data = buffer.getvalue()
    budget = PixelBudget(2 * width * height)  # two images at a time
    images = []
    threads = [threading.Thread(target=lambda: images.append(decode_image(data, 10**6, budget))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(images) == 8 and all(image.size == (width, height) for image in images)
    assert width * height <= budget.peak <= 2 * width * height and budget.in_use == 0


def test_decode_waits_for_the_budget_and_the_pipeline_sets_it(tiny_settings):
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "PNG")
    budget = PixelBudget(150)
    held = budget.acquire(100)
    decoded = []
    decoder = threading.Thread(target=lambda: decoded.append(decode_image(buffer.getvalue(), 10**6, budget)))
    decoder.start()
    deadline = time.monotonic() + 30  # a guard against hanging, not a timing assertion
    while budget.waiting == 0 and decoder.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert budget.waiting == 1 and not decoded, "the 10x10 decode must wait: only 50 of 150 pixels are free"
    budget.release(held)
    decoder.join(timeout=30)
    assert len(decoded) == 1 and budget.in_use == 0 and budget.waiting == 0
    pipeline = Pipeline(Settings(decode_budget_mp=5.0))
    assert pipeline.loader.budget.capacity == 5_000_000


# ------------------------------------------------------------------------------ settings

def test_bound_settings_defaults_and_env():
    defaults = Settings.from_env({})
    assert (defaults.max_tasks_per_request, defaults.max_smart_prompts) == (1000, 64)
    assert defaults.max_image_pixels == 40_000_000 and defaults.decode_budget_mp == 100.0
    assert defaults.allow_unauthenticated_bulk is False
    tuned = Settings.from_env({"MAX_TASKS_PER_REQUEST": "10", "MAX_SMART_PROMPTS": "3", "DECODE_BUDGET_MP": "12.5",
                               "ALLOW_UNAUTHENTICATED_BULK": "true"})
    assert (tuned.max_tasks_per_request, tuned.max_smart_prompts, tuned.decode_budget_mp) == (10, 3, 12.5)
    assert tuned.allow_unauthenticated_bulk is True
    for env in ({"MAX_TASKS_PER_REQUEST": "0"}, {"MAX_SMART_PROMPTS": "x"}, {"ALLOW_UNAUTHENTICATED_BULK": "maybe"},
                {"DECODE_BUDGET_MP": "0"}):
        with pytest.raises(SettingsError):
            Settings.from_env(env)
