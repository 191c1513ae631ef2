"""Cloud storage images (s3://, gs://, azure-blob://) resolved through Label Studio's presign endpoint.

backend.images.cloud (the presign request, which LS requests are presign requests) against
label-studio-sdk's own encoding, the loader's reasons when it cannot ask LS, and the pipeline
carrying each task's id to the loader (a loopback "LS" from tests/imageserver.py answering
/tasks/<id>/presign/ like LS 1.23 does; the tiny real models). The security of the storage hop
is tested in tests/test_ssrf.py; the real LS + S3 round trip in tests/test_e2e_cloud.py.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import pytest
from PIL import Image

from backend.images.cloud import MAX_CLOUD_URI_CHARS, cloud_scheme, is_resolve_request, presign_url
from backend.images.fetch import FetchSettings, ImageError, ImageLoader
from backend.ls.labelconfig import parse_label_config
from backend.ls.tasks import PredictRequest
from backend.pipeline.predict import Pipeline
from tests.imageserver import ImageServer

LEGACY = "0123456789abcdef0123456789abcdef01234567"
LS = "http://ls.test:8080"
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>'
          '</View>')


def _png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# the presign request


@pytest.mark.parametrize("uri", ["s3://bucket/a/b c.jpg", "gs://b/ключ.png", "azure-blob://container/x?.png",
                                 "s3://b/" + "k" * 1000])
def test_presign_url_encodes_the_uri_like_label_studio_sdk(uri):
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri

    assert presign_url(LS, 42, uri) == f"{LS}/tasks/42/presign/?fileuri={encode_presign_fileuri(uri)}"
    assert base64.urlsafe_b64decode(presign_url(LS, 42, uri).split("fileuri=")[1]).decode() == uri


def test_cloud_schemes_are_the_ones_ls_storages_write():
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import is_cloud_storage_uri

    for uri in ("s3://b/k.jpg", "gs://b/k.jpg", "azure-blob://c/k.jpg"):
        assert cloud_scheme(uri) and is_cloud_storage_uri(uri)
    for uri in ("http://b/k.jpg", "/data/upload/1/k.jpg", "S3://b/k.jpg", "s3:/b/k", "data:image/png;base64,"):
        assert cloud_scheme(uri) is None


@pytest.mark.parametrize("task_id", [None, 0, -1, True, "7", 7.0, 2**63, {"id": 7}])
def test_presign_needs_a_label_studio_task_id(task_id):
    with pytest.raises(ImageError, match="task has no usable id"):
        presign_url(LS, task_id, "s3://bucket/k.jpg")


@pytest.mark.parametrize("uri, fragment", [
    ("s3:///k.jpg", "names no bucket"),
    ("gs://", "names no bucket"),
    ("s3://b/k\n.jpg", "control or invisible"),
    ("s3://b/" + "k" * MAX_CLOUD_URI_CHARS, "over the limit"),
])
def test_unusable_cloud_uris_fail_with_a_reason(uri, fragment):
    with pytest.raises(ImageError, match=fragment) as err:
        presign_url(LS, 1, uri)
    assert "\n" not in err.value.reason and len(err.value.reason) < 400


PRESIGN_REQUESTS = [("/tasks/7/presign/?fileuri=czM6Ly9i", ""), ("/tasks/7/resolve/?fileuri=czM6Ly9i", ""),
                    ("/projects/3/presign/?fileuri=czM6Ly9i", ""), ("/tasks/7/presign?fileuri=x", ""),
                    ("/ls/tasks/7/presign/?fileuri=x", "/ls")]
OTHER_LS_REQUESTS = [("/tasks/7/presign/?fileuri=x", "/ls"), ("/ls/tasks/7/presign/?fileuri=x", ""),
                     ("/api/tasks/7/presign/", ""), ("/tasks/7/presign/extra", ""), ("/tasks/x/presign/", ""),
                     ("/data/upload/1/tasks/7/presign/", ""), ("/tasks/7/annotations/", "")]


def test_which_ls_requests_are_presign_requests():
    assert all(is_resolve_request(uri, prefix) for uri, prefix in PRESIGN_REQUESTS)
    assert not any(is_resolve_request(uri, prefix) for uri, prefix in OTHER_LS_REQUESTS)


# ------------------------------------------------------------------------------------------------
# the loader


def test_cloud_uri_without_label_studio_url_fails_with_a_clear_reason():
    loader = ImageLoader(FetchSettings(label_studio_url=None, api_key=None))
    try:
        with pytest.raises(ImageError) as err:
            loader.load("s3://bucket/img.jpg", task_id=3)
    finally:
        loader.close()
    reason = err.value.reason
    assert "s3://bucket/img.jpg" in reason and "LABEL_STUDIO_URL" in reason and "cloud storage" in reason


@pytest.fixture(scope="module")
def ls():
    """A loopback "Label Studio" that answers /tasks/<id>/presign/ in proxy mode (pre-signed URLs
    off): the object's bytes, to requests with the legacy token only."""
    srv = ImageServer(legacy_token=LEGACY, pat="unused").start()
    sizes = {5: (64, 48), 6: (40, 70)}
    for task_id, size in sizes.items():
        body = _png(*size)

        def serve(handler, query, body=body):
            uri = base64.urlsafe_b64decode(query["fileuri"][0].encode()).decode()
            if not srv.authorized(handler):
                handler.send_json(401, {})
            elif uri.startswith("s3://bucket/"):
                handler.send_bytes(200, body, "image/png")
            else:
                handler.send_json(404, {})

        srv.route("GET", f"/tasks/{task_id}/presign/", serve)
    yield srv
    srv.stop()


def test_loader_without_task_id_names_what_is_missing(ls):
    loader = ImageLoader(FetchSettings(label_studio_url=ls.base, api_key=LEGACY))
    try:
        with pytest.raises(ImageError, match="task has no usable id"):
            loader.load("s3://bucket/a.png")
        assert loader.load("s3://bucket/a.png", task_id=5).width == 64
    finally:
        loader.close()


def test_pipeline_sends_each_tasks_id_to_label_studio(ls, tiny_settings, engine):
    """Batch predict of cloud tasks: each image is asked for under its own task's id; a URI that
    LS has no storage for fails its own task only, with the reason."""
    ls.reset()
    settings = replace(tiny_settings, label_studio_url=ls.base, label_studio_api_key=LEGACY)
    pipeline = Pipeline(settings, engine_factory=lambda: engine)
    tasks = [{"id": 5, "data": {"image": "s3://bucket/a.png"}},
             {"id": 6, "data": {"image": "s3://bucket/b.png"}},
             {"id": 5, "data": {"image": "gs://elsewhere/c.png"}}]
    request = PredictRequest(tasks=tasks, config=parse_label_config(CONFIG), context=None, prompt="cat")
    try:
        outcomes = pipeline.predict_outcomes(request)
    finally:
        pipeline.loader.close()
    asked = sorted(path.split("?")[0] for path in ls.paths())
    assert asked == ["/tasks/5/presign/", "/tasks/5/presign/", "/tasks/6/presign/"]
    assert [o.error is None for o in outcomes] == [True, True, False]
    sizes = [{(r["original_width"], r["original_height"]) for r in o.prediction["result"]} for o in outcomes[:2]]
    assert sizes == [{(64, 48)}, {(40, 70)}]
    assert "gs://elsewhere/c.png" in outcomes[2].error and "no import storage" in outcomes[2].error
