"""The request bodies recorded from a real LS 1.23.2 (shared/ls-protocol/) replayed over real HTTP
against the backend served by gunicorn, with a local server playing LS's media endpoints."""

import copy
import io
import time

import pytest
import requests
from PIL import Image, ImageDraw

from backend.rle import rle_to_mask
from tests.conftest import recorded
from tests.imageserver import ImageServer, make_jwt

LEGACY_TOKEN = "harness-legacy-token-0123456789"
IMAGES = {  # the recorded tasks' images, at the sizes LS stored in its predictions
    "/data/upload/1/d984276e-shapes_landscape.png": (320, 240),
    "/data/upload/1/427a5455-shapes_portrait.png": (240, 320),
    "/data/upload/1/be8869eb-shapes_odd.png": (301, 199),
}
LOCAL_FILES = {f"/data/local-files/?d=project2/shapes_{name}.png": size for name, size in
               [("landscape", (320, 240)), ("portrait", (240, 320)), ("odd", (301, 199))]}


def png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 5, height // 5, width // 2, height // 2], fill=(255, 165, 0))
    draw.rectangle([width // 2, height // 2, width - 10, height - 10], fill=(30, 144, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ls_media():
    pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600, "jti": "pat-1", "user_id": 1})
    server = ImageServer(legacy_token=LEGACY_TOKEN, pat=pat).start()
    for path, size in IMAGES.items():
        server.ls_static(path, png(*size))
    server.route("GET", "/data/local-files/", lambda handler, query: (
        handler.send_bytes(200, png(*LOCAL_FILES[f"/data/local-files/?d={query['d'][0]}"]), "image/png")
        if server.authorized(handler) else handler.send_json(401, {"detail": "no credentials"})))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(start_backend, ls_media):
    return start_backend(server="gunicorn", LABEL_STUDIO_URL=ls_media.base, LABEL_STUDIO_API_KEY=LEGACY_TOKEN)


def replay(backend, name: str) -> requests.Response:
    record = recorded(name)
    return requests.request(record["method"], backend.url + record["path"], json=record["body"],
                            headers={"User-Agent": record["headers"]["User-Agent"]}, timeout=60)


def stored_region_keys() -> set[str]:
    stored = recorded("ls_stored_predictions.json")
    return set(next(iter(stored.values()))[0]["result"][0])


def check_prediction(prediction: dict, size: tuple[int, int], labels: set[str]) -> None:
    width, height = size
    assert prediction["model_version"] == "grounding-dino+sam"
    regions = prediction["result"]
    assert regions, "thresholds are 0: the tiny models must detect something"
    ids = [r["id"] for r in regions]
    assert len(set(ids)) == len(ids) and all(len(i) >= 10 for i in ids)
    kinds = {"rectanglelabels": [], "brushlabels": []}
    for region in regions:
        assert set(region) == stored_region_keys()
        assert region["to_name"] == "image"
        assert (region["original_width"], region["original_height"]) == size
        assert 0 <= region["score"] <= 1
        kind = region["type"]
        assert region["from_name"] == {"rectanglelabels": "label", "brushlabels": "label2"}[kind]
        label = region["value"][kind]
        assert len(label) == 1 and label[0] in labels
        kinds[kind].append(label[0])
        if kind == "rectanglelabels":
            v = region["value"]
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and v["width"] > 0 and v["height"] > 0
            assert v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
        else:
            assert region["value"]["format"] == "rle"
            assert rle_to_mask(region["value"]["rle"], height, width).shape == (height, width)
    assert sorted(kinds["rectanglelabels"]) == sorted(kinds["brushlabels"])
    mean = sum(r["score"] for r in regions if r["type"] == "rectanglelabels") / len(kinds["rectanglelabels"])
    assert prediction["score"] == pytest.approx(mean)


def test_health_and_setup(backend):
    health = replay(backend, "health_request.json")
    assert health.status_code == 200
    state = health.json()
    models, engines = state.pop("models"), state.pop("engines")
    assert state == {"status": "UP", "model_class": "GroundedSAM", "model_version": "grounding-dino+sam",
                     "mode": "embedded", "engine": "grounded-sam"}
    assert set(models) == {"GROUNDING_DINO_MODEL", "SAM_MODEL", "TRACKER_MODEL"} and models["SAM_MODEL"].endswith("/sam")
    assert engines == {"grounded-sam": {"model_versions": ["grounding-dino+sam"], "models": models}}
    setup = replay(backend, "setup_request.json")
    assert setup.status_code == 200 and setup.json() == {"model_version": "grounding-dino+sam"}


def test_batch_predict_one_prediction_per_task_in_order(backend, ls_media):
    ls_media.reset()
    response = replay(backend, "predict_batch_request.json")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    for prediction, size in zip(results, IMAGES.values()):
        check_prediction(prediction, size, {"circle", "square"})
    fetched = [r for r in ls_media.requests if r.path in IMAGES]
    assert sorted(r.path for r in fetched) == sorted(IMAGES)
    assert all(r.authorization == f"Token {LEGACY_TOKEN}" for r in fetched)


def test_interactive_predict_uses_the_textarea_prompt(backend):
    response = replay(backend, "predict_interactive_request.json")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 1
    check_prediction(results[0], (320, 240), {"circle"})


def test_webhook_is_acknowledged(backend):
    response = replay(backend, "webhook_annotation_created.json")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "action": "ANNOTATION_CREATED"}


def test_local_files_with_a_personal_access_token(start_backend, ls_media):
    """PAT → /api/token/refresh/ → Bearer access token on the local-files image fetches."""
    backend = start_backend(LABEL_STUDIO_URL=ls_media.base, LABEL_STUDIO_API_KEY=ls_media.pat)
    body = copy.deepcopy(recorded("predict_batch_request.json")["body"])
    for task, url in zip(body["tasks"], LOCAL_FILES):
        task["data"]["image"] = url
    ls_media.reset()
    response = requests.post(f"{backend.url}/predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    for prediction, size in zip(response.json()["results"], LOCAL_FILES.values()):
        check_prediction(prediction, size, {"circle", "square"})
    fetches = [r for r in ls_media.requests if r.path.startswith("/data/local-files/")]
    assert len(fetches) == 3 and ls_media.refresh_calls == 1
    assert all(r.authorization == f"Bearer {ls_media.issued_access[0]}" for r in fetches)
    assert ls_media.pat not in backend.log_text() and LEGACY_TOKEN not in backend.log_text()
