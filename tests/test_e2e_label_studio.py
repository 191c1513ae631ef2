"""End-to-end: a real Label Studio 1.23 server talking to our backend (a real subprocess).

One LS server is shared by the whole module (its first start runs the migrations, ~30 s on 2 cores).
Each test starts its own backend through the ``start_backend`` fixture (tests/conftest.py) and does
everything that needs that backend inside the test, so the fixture's scope does not matter.

Run: ``pytest -m e2e tests/test_e2e_label_studio.py`` (LS from $LABEL_STUDIO_BIN, .venv-ls or PATH;
skipped when missing, except with CI=true where a missing LS fails the run).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from tests.lsharness import LabelStudioClient, LabelStudioServer

pytestmark = pytest.mark.e2e

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true" placeholder="Text prompt, e.g. cat . red car"/>
  <RectangleLabels name="label" toName="image">
    <Label value="cat"/>
    <Label value="dog" predicted_values="puppy, hound"/>
  </RectangleLabels>
  <BrushLabels name="mask" toName="image">
    <Label value="cat"/>
    <Label value="dog" predicted_values="puppy, hound"/>
  </BrushLabels>
</View>"""

LABELS = {"cat", "dog"}
TYPE_BY_FROM_NAME = {"label": "rectanglelabels", "mask": "brushlabels"}
IMAGE_SIZES = {"landscape": (320, 240), "portrait": (240, 320), "odd": (301, 199)}  # name -> (W, H)
EPS = 1e-6


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pat(label_studio_pat) -> str:
    """The admin's personal access token (LS allows one live PAT per user: the session's, tests/conftest.py)."""
    token = label_studio_pat
    assert token.count(".") == 2, f"PAT is not a JWT: {token[:20]}..."
    return token


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """name -> Path of a PNG with a few filled shapes; sizes from IMAGE_SIZES."""
    out = tmp_path_factory.mktemp("e2e-images")
    paths = {}
    for i, (name, (w, h)) in enumerate(IMAGE_SIZES.items()):
        img = Image.new("RGB", (w, h), (200 - 40 * i, 220, 180 + 20 * i))
        d = ImageDraw.Draw(img)
        d.ellipse([w * 0.1, h * 0.15, w * 0.55, h * 0.7], fill=(230, 120, 20), outline=(0, 0, 0), width=2)
        d.rectangle([w * 0.6, h * 0.5, w * 0.92, h * 0.9], fill=(30, 60, 200))
        d.polygon([(w * 0.2, h * 0.95), (w * 0.45, h * 0.75), (w * 0.5, h * 0.97)], fill=(20, 160, 40))
        p = out / f"shapes_{name}.png"
        img.save(p)
        paths[name] = p
    return paths


# ---------------------------------------------------------------------------- checks
def _decode_mask(rle, width: int, height: int) -> np.ndarray:
    """LS brush RLE -> bool (H, W) mask, with the reference decoder from label-studio-sdk."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = decode_rle(rle)
    assert flat.size == width * height * 4, (
        f"RLE decodes to {flat.size} values, expected {height}x{width}x4 = {width * height * 4}")
    mask = flat.reshape(height, width, 4).max(axis=2) > 0
    from backend.rle import rle_to_mask  # cross-check our own decoder against the SDK's
    ours = np.asarray(rle_to_mask(rle, height, width))
    assert ours.shape == (height, width), f"backend.rle.rle_to_mask shape {ours.shape} != {(height, width)}"
    assert np.array_equal(ours.astype(bool), mask), "backend.rle.rle_to_mask disagrees with the SDK decoder"
    return mask


def check_result(result: list, width: int, height: int, allowed_labels: set, where: str) -> Counter:
    """Structural checks of one prediction's ``result`` list; returns Counter of (type, label)."""
    assert isinstance(result, list) and result, f"{where}: no regions in prediction result: {result!r}"
    ids = []
    counts = Counter()
    for i, region in enumerate(result):
        w = f"{where} region #{i} ({region.get('type')}, id={region.get('id')})"
        from_name = region.get("from_name")
        assert from_name in TYPE_BY_FROM_NAME, f"{w}: from_name {from_name!r} not in {set(TYPE_BY_FROM_NAME)}"
        rtype = TYPE_BY_FROM_NAME[from_name]
        assert region.get("type") == rtype, f"{w}: type {region.get('type')!r} != {rtype!r} for {from_name}"
        assert region.get("to_name") == "image", f"{w}: to_name {region.get('to_name')!r}"
        assert region.get("original_width") == width and region.get("original_height") == height, (
            f"{w}: original size {region.get('original_width')}x{region.get('original_height')} "
            f"!= image {width}x{height}")
        rid = region.get("id")
        assert isinstance(rid, str) and len(rid) >= 10, f"{w}: region id {rid!r} shorter than 10 chars"
        ids.append(rid)
        value = region.get("value") or {}
        labels = value.get(rtype)
        assert isinstance(labels, list) and len(labels) == 1 and labels[0] in allowed_labels, (
            f"{w}: value[{rtype!r}] = {labels!r}, want one of {sorted(allowed_labels)}")
        if rtype == "rectanglelabels":
            x, y, bw, bh = (value.get(k) for k in ("x", "y", "width", "height"))
            for k, v in zip(("x", "y", "width", "height"), (x, y, bw, bh)):
                assert isinstance(v, (int, float)) and -EPS <= v <= 100 + EPS, f"{w}: {k}={v!r} not in 0..100"
            assert x + bw <= 100 + EPS and y + bh <= 100 + EPS, f"{w}: box {x},{y},{bw},{bh} leaves the image"
        else:
            assert value.get("format") == "rle", f"{w}: brush format {value.get('format')!r} != 'rle'"
            rle = value.get("rle")
            assert isinstance(rle, list) and rle and all(isinstance(b, int) and 0 <= b <= 255 for b in rle), (
                f"{w}: rle is not a non-empty list of bytes")
            mask = _decode_mask(rle, width, height)
            assert mask.any(), f"{w}: mask has no foreground pixel"
        counts[(rtype, labels[0])] += 1
    dupes = [k for k, n in Counter(ids).items() if n > 1]
    assert not dupes, f"{where}: duplicate region ids {dupes}"
    for label in allowed_labels:
        n_rect, n_brush = counts[("rectanglelabels", label)], counts[("brushlabels", label)]
        assert n_rect == n_brush, (
            f"{where}: label {label!r} has {n_rect} rectanglelabels but {n_brush} brushlabels regions")
    return counts


def check_stored_predictions(ls: LabelStudioClient, task_sizes: dict, where: str) -> None:
    for task_id, (w, h) in task_sizes.items():
        preds = ls.predictions(task_id)
        assert len(preds) == 1, (
            f"{where}: task {task_id} has {len(preds)} stored predictions, want exactly 1: "
            f"{[{k: p.get(k) for k in ('id', 'model_version', 'score')} for p in preds]}")
        pred = preds[0]
        assert pred.get("model_version"), f"{where}: task {task_id}: empty model_version: {pred.get('model_version')!r}"
        counts = check_result(pred.get("result"), w, h, LABELS, f"{where} task {task_id} ({w}x{h})")
        print(f"[e2e] {where} task {task_id} ({w}x{h}) model_version={pred['model_version']!r}: "
              f"{sorted(counts.items())}")


@contextmanager
def logs_on_failure(label_studio: LabelStudioServer, backend=None):
    """Print the tails of the LS and backend logs (captured stdout, shown by pytest) if the block fails."""
    try:
        yield
    except BaseException:
        print(f"\n[e2e] ---- Label Studio log tail ({label_studio.log_path}) ----\n{label_studio.log_tail(12000)}")
        if backend is not None:
            print(f"\n[e2e] ---- backend log tail ({backend.log_path}) ----\n"
                  f"{backend.log_text()[-12000:]}")
        raise


def http_status(url: str, headers: dict) -> int:
    with requests.Session() as session:
        session.trust_env = False  # no proxy for 127.0.0.1
        return session.get(url, headers=headers, timeout=30).status_code


def connect(ls: LabelStudioClient, project_id: int, backend, title: str) -> int:
    ml_id = ls.connect_ml_backend(project_id, backend.url, title, is_interactive=True)
    state = ls.ml_backend(ml_id)
    assert state.get("state") == "CO", f"ML backend not connected: {state}"
    return ml_id


# ---------------------------------------------------------------------------- tests
def test_retrieve_predictions_and_interactive_legacy_token(label_studio, ls, images, start_backend):
    project_id = ls.create_project("e2e grounded-sam (legacy token)", LABEL_CONFIG)
    names = list(IMAGE_SIZES)
    task_ids = ls.import_images(project_id, [images[n] for n in names])
    task_sizes = {tid: IMAGE_SIZES[n] for tid, n in zip(task_ids, names)}
    for tid, n in zip(task_ids, names):
        url = ls.task(tid)["data"]["image"]
        assert url.startswith(f"/data/upload/{project_id}/") and url.endswith(f"shapes_{n}.png"), url

    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    with logs_on_failure(label_studio, backend):
        ml_id = connect(ls, project_id, backend, "grounded-sam e2e")

        # 1. Data Manager "Retrieve predictions" on all tasks: LS sends one batched /predict, stores
        t0 = time.monotonic()
        res = ls.retrieve_predictions(project_id)
        print(f"[e2e] retrieve predictions for {len(task_ids)} tasks: {time.monotonic() - t0:.1f}s, {res}")
        check_stored_predictions(ls, task_sizes, "retrieve(legacy token)")

        # 2. interactive: the prompt TextArea's text comes as context; "dog" maps to the label dog
        context = {"result": [{"id": "p1", "from_name": "prompt", "to_name": "image", "type": "textarea",
                               "value": {"text": ["dog"]}, "origin": "manual"}]}
        task_id = task_ids[0]
        answer = ls.interactive_annotating(ml_id, task_id, context)
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), (
            f"interactive-annotating failed: {str(answer)[:2000]}")
        data = answer["data"]
        assert data.get("model_version"), f"interactive prediction without model_version: {data!r:.300}"
        w, h = task_sizes[task_id]
        counts = check_result(data.get("result"), w, h, {"dog"}, f"interactive(prompt 'dog') task {task_id}")
        print(f"[e2e] interactive task {task_id}: {sorted(counts.items())}")
        # interactive answers are not stored: still exactly the one prediction from step 1
        assert len(ls.predictions(task_id)) == 1


def test_retrieve_predictions_with_personal_access_token(label_studio, pat, images, start_backend):
    """PAT instead of the legacy token, with legacy tokens disabled for the organization (the LS 1.23
    default for a fresh org), so the backend can only read images with the JWT flow:
    POST /api/token/refresh/ {"refresh": PAT} -> access, then "Authorization: Bearer <access>".
    Tasks are local-files URLs (/data/local-files/?d=...), the other way LS serves images."""
    pat_ls = LabelStudioClient(label_studio.url, pat=pat)
    assert pat_ls.whoami()["email"] == label_studio.username

    project_id = pat_ls.create_project("e2e grounded-sam (PAT, local files)", LABEL_CONFIG)
    subdir = Path(label_studio.local_files_root) / f"project{project_id}"
    subdir.mkdir(parents=True, exist_ok=True)
    names = list(IMAGE_SIZES)
    for n in names:
        (subdir / images[n].name).write_bytes(images[n].read_bytes())
    pat_ls.add_local_files_storage(project_id, subdir)
    task_ids = pat_ls.import_tasks(
        project_id, [{"data": {"image": f"/data/local-files/?d={subdir.name}/{images[n].name}"}} for n in names])
    task_sizes = {tid: IMAGE_SIZES[n] for tid, n in zip(task_ids, names)}

    # the auth matrix LS applies to image URLs (as recorded in shared/ls-protocol/image_auth_matrix.json)
    image_url = label_studio.url + pat_ls.task(task_ids[0])["data"]["image"]
    bearer = {"Authorization": f"Bearer {pat_ls.refresh_access_token(pat)}"}
    legacy = {"Authorization": f"Token {label_studio.legacy_token}"}
    assert http_status(image_url, bearer) == 200
    assert http_status(image_url, legacy) == 200
    assert http_status(image_url, {"Authorization": f"Token {pat}"}) == 401
    assert http_status(image_url, {"Authorization": f"Bearer {pat}"}) == 401

    pat_ls.set_jwt_settings(api_tokens_enabled=True, legacy_api_tokens_enabled=False)
    try:
        assert http_status(image_url, legacy) == 401, "legacy token still accepted after disabling legacy tokens"
        backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=pat)
        with logs_on_failure(label_studio, backend):
            connect(pat_ls, project_id, backend, "grounded-sam e2e (PAT)")
            t0 = time.monotonic()
            res = pat_ls.retrieve_predictions(project_id)
            print(f"[e2e] retrieve predictions (PAT) for {len(task_ids)} tasks: {time.monotonic() - t0:.1f}s, {res}")
            check_stored_predictions(pat_ls, task_sizes, "retrieve(PAT, legacy tokens disabled)")
    finally:
        try:  # the LS server is shared by the module: give the other tests their legacy token back
            pat_ls.set_jwt_settings(api_tokens_enabled=True, legacy_api_tokens_enabled=True)
        except Exception as exc:  # don't hide the test's own failure
            print(f"[e2e] could not re-enable legacy tokens: {exc}")
    assert http_status(image_url, legacy) == 200


SMART_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <KeyPointLabels name="click" toName="image" smart="true" smartOnly="true">
    <Label value="cat"/>
    <Label value="dog"/>
  </KeyPointLabels>
  <RectangleLabels name="label" toName="image" smart="true">
    <Label value="cat"/>
    <Label value="dog"/>
  </RectangleLabels>
  <BrushLabels name="mask" toName="image">
    <Label value="cat"/>
    <Label value="dog"/>
  </BrushLabels>
</View>"""


def test_interactive_smart_click_returns_a_mask_with_the_click_label(label_studio, ls, images, start_backend):
    """The README's smart-tool config: a keypoint click (percent coordinates, its own label) comes
    back as a brush mask at the image's size with that label, plus its bounding rectangle."""
    project_id = ls.create_project("e2e smart click", SMART_CONFIG)
    task_id, = ls.import_images(project_id, [images["portrait"]])
    width, height = IMAGE_SIZES["portrait"]
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    with logs_on_failure(label_studio, backend):
        ml_id = connect(ls, project_id, backend, "grounded-sam smart")
        click = {"id": "k1", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                 "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": True,
                 "value": {"x": 35.0, "y": 40.0, "width": 0.6, "keypointlabels": ["dog"]}}
        answer = ls.interactive_annotating(ml_id, task_id, {"result": [click]})
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), str(answer)[:2000]
        counts = check_result(answer["data"]["result"], width, height, {"dog"}, f"smart click task {task_id}")
        assert counts[("brushlabels", "dog")] == 1 and counts[("rectanglelabels", "dog")] == 1
