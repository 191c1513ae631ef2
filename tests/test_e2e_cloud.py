"""End-to-end: images in S3, imported by a real Label Studio 1.23, read by our backend through LS.

An S3-compatible server (``moto_server`` from moto[server]) runs on 127.0.0.1; the test uploads
images into a bucket with boto3, creates an LS S3 import storage on the session's LS pointing at it
(``s3_endpoint``, ``use_blob_urls``: tasks hold ``s3://bucket/key``), syncs it, connects the backend
and runs what LS users run: "Retrieve predictions" (LS's batch /predict), an interactive prompt,
and a bulk run (``python -m backend prelabel``). With pre-signed URLs on, LS answers the backend's
``/tasks/<id>/presign/`` with a 303 to the loopback S3 (a private host, followed because LS's
presign answer named it); with them off, LS streams the object itself.

LS needs ``SSRF_PROTECTION_ENABLED=false`` to accept a loopback ``s3_endpoint`` (tests/lsharness.py
sets it for every e2e test); the backend runs with ``ALLOW_PRIVATE_URLS`` unset (false).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.lsharness import ML_CALL_TIMEOUT
from tests.processes import free_port
from tests.test_e2e_label_studio import (IMAGE_SIZES, LABEL_CONFIG, check_result, check_stored_predictions,
                                         connect, images, logs_on_failure)

pytestmark = pytest.mark.e2e

__all__ = ["images"]  # the fixture, shared with tests/test_e2e_label_studio.py

BUCKET = "gsam-e2e"
REPO = Path(__file__).resolve().parent.parent
# boto3 and moto read these; dummy values keep them from looking for real credentials
S3_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


class MotoServer:
    """``moto_server`` (moto[server]'s S3 and friends) on 127.0.0.1 and a free port, logging each
    request (werkzeug's access log) to ``log_path``."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                   NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        session = requests.Session()
        session.trust_env = False
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited ({self.process.returncode}): {self.log_text()[-2000:]}")
            try:
                if session.get(f"{self.url}/moto-api/", timeout=2).status_code < 500:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server not up after 60 s: {self.log_text()[-2000:]}")
            time.sleep(0.2)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signed_gets(self, key: str) -> int:
        """GETs of ``key`` with a pre-signed query (only the backend's, following LS's 303: LS
        itself reads objects with header-signed requests)."""
        pattern = re.compile(rf'"GET /{re.escape(BUCKET)}/{re.escape(key)}\?[^ "]*Signature=[^ "]* HTTP')
        return len(pattern.findall(self.log_text()))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    import boto3

    client = boto3.client("s3", endpoint_url=server.url, **S3_KEYS)
    client.create_bucket(Bucket=BUCKET)
    server.client = client
    yield server
    server.stop()


def cloud_project(ls, s3, images, title: str, prefix: str, presign: bool) -> dict:
    """A project whose tasks come from an S3 import storage: task id -> (key, (width, height))."""
    project_id = ls.create_project(title, LABEL_CONFIG)
    for name, path in images.items():
        s3.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes(),
                             ContentType="image/png")
    storage_id = ls.add_s3_storage(project_id, BUCKET, endpoint=s3.url, prefix=prefix, presign=presign,
                                   title=f"moto {prefix}")
    ls.sync_s3_storage(storage_id)
    deadline = time.monotonic() + 60
    while len(tasks := ls.tasks(project_id)) < len(images) and time.monotonic() < deadline:
        time.sleep(0.5)  # the sync may finish after its request answers
    by_name = {path.name: name for name, path in images.items()}
    out = {}
    for task in tasks:
        uri = task["data"]["image"]
        if uri.startswith(f"/tasks/{task['id']}/resolve/?fileuri="):  # /api/tasks resolves URIs for the UI
            uri = base64.urlsafe_b64decode(uri.split("fileuri=", 1)[1].encode()).decode()
        assert uri.startswith(f"s3://{BUCKET}/{prefix}/"), f"task {task['id']}: {uri!r} is not an s3:// URI"
        key = uri[len(f"s3://{BUCKET}/"):]
        out[task["id"]] = (key, IMAGE_SIZES[by_name[key.rsplit("/", 1)[1]]])
    assert len(out) == len(images), f"synced {len(out)} tasks, want {len(images)}: {tasks}"
    return {"project": project_id, "tasks": out}


@pytest.mark.parametrize("presign", [True, False], ids=["presigned-urls", "proxied-by-ls"])
def test_retrieve_and_interactive_predictions_on_an_s3_project(label_studio, ls, s3, images, start_backend,
                                                               presign):
    prefix = "presign" if presign else "proxy"
    project = cloud_project(ls, s3, images, f"e2e cloud ({prefix})", prefix, presign)
    tasks = project["tasks"]
    sizes = {task_id: size for task_id, (_, size) in tasks.items()}
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    with logs_on_failure(label_studio, backend):
        ml_id = connect(ls, project["project"], backend, f"grounded-sam cloud {prefix}")
        ls.retrieve_predictions(project["project"])
        check_stored_predictions(ls, sizes, f"retrieve(s3, {prefix})")

        context = {"result": [{"id": "p1", "from_name": "prompt", "to_name": "image", "type": "textarea",
                               "value": {"text": ["dog"]}, "origin": "manual"}]}
        task_id = min(tasks)
        answer = ls.interactive_annotating(ml_id, task_id, context)
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), str(answer)[:2000]
        check_result(answer["data"].get("result"), *sizes[task_id], {"dog"}, f"interactive(s3, {prefix})")

        # the backend asked LS's presign endpoint under each task's own id
        ls_log = label_studio.log_path.read_text(errors="replace")
        for task_id, (key, _) in tasks.items():
            fileuri = base64.urlsafe_b64encode(f"s3://{BUCKET}/{key}".encode()).decode()
            assert f'"GET /tasks/{task_id}/presign/?fileuri={fileuri} HTTP' in ls_log, task_id
        # presigned: each object was fetched from S3 by the backend (LS's 303); proxied: never directly
        direct = {key: s3.signed_gets(key) for key, _ in tasks.values()}
        if presign:
            assert all(n >= 1 for n in direct.values()), direct
        else:
            assert not any(direct.values()), direct
        log = backend.log_text()
        assert label_studio.legacy_token not in log and "image load failed" not in log, log[-3000:]


def test_bulk_prelabel_on_an_s3_project(label_studio, ls, s3, images, tiny_env, tmp_path):
    """``python -m backend prelabel``: the task list comes from LS's Data Manager (raw data: the
    s3:// URIs, as /predict gets them), images through LS's presign endpoint."""
    project = cloud_project(ls, s3, images, "e2e cloud bulk", "bulk", presign=True)
    sizes = {task_id: size for task_id, (_, size) in project["tasks"].items()}
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "ALLOW_PRIVATE_URLS"}}
    env.update(tiny_env, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token,
               LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    with logs_on_failure(label_studio):
        done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project["project"])],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=ML_CALL_TIMEOUT)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert label_studio.legacy_token not in output
        check_stored_predictions(ls, sizes, "bulk prelabel (s3)")
        assert "3 done" in output or "done=3" in output, output[-2000:]
        assert all(s3.signed_gets(key) >= 1 for key, _ in project["tasks"].values())
