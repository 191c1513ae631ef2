"""The HTTP surface over real HTTP: errors are JSON 4xx, bad images give per-task empty predictions,
auth guards the right routes, and the server keeps answering after all of it."""

import base64
import io
import socket
import time

import pytest
import requests
from PIL import Image

from tests.conftest import free_port, recorded
from tests.imageserver import ImageServer, make_jwt
from tests.test_protocol import png

TOKEN = "test-legacy-token-42"
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<TextArea name="prompt" toName="image"/>'
          '<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>'
          '<BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels></View>')
GOOD = "data:image/png;base64," + base64.b64encode(png(64, 48)).decode()


def body(*urls, prompt=None, config=CONFIG):
    context = None
    if prompt is not None:
        context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                               "value": {"text": [prompt]}}]}
    return {"tasks": [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(urls)],
            "label_config": config, "project": "1.1", "params": {"context": context}}


def bomb_png() -> bytes:
    """20000 x 20000 one-bit PNG: a few KB on the wire, 400 megapixels decoded."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile():
    pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600})
    server = ImageServer(legacy_token=TOKEN, pat=pat).start()
    server.ls_static("/data/upload/1/good.png", png(80, 60))
    server.ls_static("/data/upload/1/corrupt.png", png(80, 60)[:40] + b"\x00garbage" * 50)
    server.ls_static("/data/upload/1/empty.png", b"")
    server.ls_static("/data/upload/1/page.html", b"<html><body>login</body></html>", "text/html")
    server.ls_static("/data/upload/1/bomb.png", bomb_png())

    def slow(handler, query):
        time.sleep(3)
        handler.send_bytes(200, png(10, 10), "image/png")

    server.route("GET", "/data/upload/1/slow.png", slow)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(start_backend, hostile):
    return start_backend(LABEL_STUDIO_URL=hostile.base, LABEL_STUDIO_API_KEY=TOKEN, PRELOAD_MODELS="false",
                         DOWNLOAD_READ_TIMEOUT="1", MAX_IMAGE_PIXELS="10000000", MAX_PROMPT_CHARS="500")


def post(backend, path, payload=None, **kwargs):
    return requests.post(backend.url + path, json=payload, timeout=60, **kwargs)


def test_health_does_not_load_models(backend):
    for path in ("/", "/health"):
        response = requests.get(backend.url + path, timeout=5)
        assert response.status_code == 200 and response.json()["status"] == "UP"
    assert "gsam_models_loaded 0.0" in requests.get(backend.url + "/metrics", timeout=5).text


def test_bad_images_get_empty_predictions_and_good_ones_still_work(backend, hostile):
    closed = f"http://127.0.0.1:{free_port()}/x.png"  # unreachable: nothing listens there
    ssrf = hostile.url("/data/upload/1/good.png", host="localhost")  # not the LS host, resolves to loopback
    urls = ["/data/upload/1/good.png", "/data/upload/1/missing.png", "/data/upload/1/slow.png",
            "/data/upload/1/corrupt.png", "/data/upload/1/empty.png", "/data/upload/1/page.html",
            "/data/upload/1/bomb.png", closed, ssrf, "/data/local-files/?d=../../etc/passwd", GOOD]
    hostile.reset()
    response = post(backend, "/predict", body(*urls))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(urls)
    assert results[0]["result"] and results[-1]["result"]
    for failed in results[1:-1]:
        assert failed == {"result": [], "score": 0.0, "model_version": "grounding-dino+sam"}
    assert not any(r.path.startswith("/data/local-files") for r in hostile.requests)
    assert all(r.headers.get("Host", "").startswith("127.0.0.1") for r in hostile.requests), "SSRF reached"
    log = backend.log_text()
    for reason in ("404", "timed out", "0 bytes", "not an image", "pixels", "loopback", "'..' segment"):
        assert reason in log.lower() or reason in log, f"no logged reason mentioning {reason!r}"
    assert requests.get(backend.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("payload, status, message", [
    (body(GOOD, prompt="cat . " * 200), 400, "shorten it"),
    ({"tasks": []}, 400, "non-empty list"),
    ({"tasks": [{"id": 1, "data": {"image": GOOD}}]}, 400, "label config is empty"),
    (body(GOOD, config='<View><Image name="image" value="$image"/></View>'), 400, "neither"),
    (body(GOOD, config="<View><Image"), 400, "not valid"),
])
def test_bad_predict_requests_are_400_json(backend, payload, status, message):
    response = post(backend, "/predict", payload)
    assert response.status_code == status
    assert response.json()["status"] == "error" and message in response.json()["message"]


def test_malformed_json_and_wrong_methods(backend):
    response = requests.post(backend.url + "/predict", data=b"{not json", timeout=5,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["message"]
    assert requests.get(backend.url + "/predict", timeout=5).status_code == 405
    missing = requests.get(backend.url + "/nope", timeout=5)
    assert missing.status_code == 404 and missing.json()["status"] == "error"
    assert post(backend, "/webhook", [1, 2]).status_code == 400


def test_setup_rejects_unusable_configs(backend):
    bad = post(backend, "/setup", {"project": "1.1", "schema": '<View><Image name="i" value="$i"/></View>'})
    assert bad.status_code == 400 and "BrushLabels" in bad.json()["message"]
    good = post(backend, "/setup", {"project": "1.1", "schema": CONFIG})
    assert good.status_code == 200 and good.json() == {"model_version": "grounding-dino+sam"}


def test_empty_prompt_uses_labels_and_prompt_maps_to_labels(backend):
    for prompt, labels in (("  ", {"cat", "dog"}), ("dog", {"dog"})):
        results = post(backend, "/predict", body(GOOD, prompt=prompt)).json()["results"]
        seen = {r["value"][r["type"]][0] for r in results[0]["result"]}
        assert seen and seen <= labels


def test_metrics_count_requests_tasks_and_regions(backend):
    post(backend, "/predict", body(GOOD))
    text = requests.get(backend.url + "/metrics", timeout=5).text
    assert 'gsam_http_requests_total{route="/predict",status="200"}' in text
    assert 'gsam_tasks_total{outcome="ok"}' in text and 'gsam_tasks_total{outcome="image_error"}' in text
    assert 'gsam_regions_total{type="brushlabels"}' in text and "gsam_models_loaded 1.0" in text


def test_logs_hold_no_tokens_bodies_or_rle(backend):
    log = backend.log_text()
    assert TOKEN not in log and "base64" not in log and '"rle"' not in log and "<View>" not in log


def test_server_survives_a_client_that_hangs_up(backend):
    with socket.create_connection(("127.0.0.1", int(backend.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"tasks\":")
    assert requests.get(backend.url + "/health", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def guarded(start_backend):
    return start_backend(BASIC_AUTH_USER="admin", BASIC_AUTH_PASS="s3cret", PRELOAD_MODELS="false",
                         ALLOW_PRIVATE_URLS="true")


def test_basic_auth_guards_everything_but_health_and_webhook(guarded):
    for path in ("/", "/metrics"):
        response = requests.get(guarded.url + path, timeout=5)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    for payload, path in ((body(GOOD), "/predict"), ({"schema": CONFIG}, "/setup")):
        assert post(guarded, path, payload).status_code == 401
        assert post(guarded, path, payload, auth=("admin", "wrong")).status_code == 401
    assert post(guarded, "/setup", {"schema": CONFIG}, auth=("admin", "s3cret")).status_code == 200
    assert requests.get(guarded.url + "/health", timeout=5).status_code == 200
    webhook = recorded("webhook_annotation_created.json")["body"]
    assert post(guarded, "/webhook", webhook).status_code == 200


def test_basic_auth_guards_the_bulk_routes(guarded):
    calls = (("POST", "/prelabel", {"project": 1}), ("GET", "/jobs/0123456789abcdef", None),
             ("DELETE", "/jobs/0123456789abcdef", None))
    for method, path, payload in calls:
        for auth in (None, ("admin", "wrong")):
            response = requests.request(method, guarded.url + path, json=payload, auth=auth, timeout=10)
            assert response.status_code == 401, (method, path, auth)
    admitted = [requests.request(method, guarded.url + path, json=payload, auth=("admin", "s3cret"), timeout=10)
                for method, path, payload in calls]
    assert [r.status_code for r in admitted] == [400, 404, 404]  # past auth: no LS configured, no such run
    assert "LABEL_STUDIO_URL" in admitted[0].json()["message"]


def test_unreachable_host_gives_an_empty_prediction(guarded):
    closed = f"http://127.0.0.1:{free_port()}/x.png"  # private URLs allowed here; nothing listens
    response = post(guarded, "/predict", body(closed, GOOD), auth=("admin", "s3cret"))
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["result"] == [] and second["result"]
    assert "empty prediction" in guarded.log_text()
