"""Pre-warmed next tasks, end to end: a real Label Studio 1.23 with several tasks, the backend as a
real subprocess. After the annotator's click on a task, the backend encodes the next tasks' SAM
embeddings in the background (in the order of the project's first Data Manager tab, read through
the LS API), so the first click on the next task is an embedding-cache hit; ``python -m backend
warm`` does the same on demand.
Run: ``pytest -m e2e tests/test_e2e_prewarm.py``."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import requests

from tests.test_e2e_label_studio import SMART_CONFIG, connect, images, logs_on_failure  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e
REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def metric(backend, name: str) -> float:
    # the basic-auth pair of the second test's backend; a backend without basic auth ignores it
    text = requests.get(backend.url + "/metrics", auth=("ann", "s3cret"), timeout=10)
    assert text.status_code == 200, text.status_code
    text = text.text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def click(ls, ml_id: int, task_id: int) -> dict:
    item = {"id": "k1", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "is_positive": True, "value": {"x": 40.0, "y": 40.0, "width": 0.6, "keypointlabels": ["dog"]}}
    answer = ls.interactive_annotating(ml_id, task_id, {"result": [item]})
    assert not answer.get("errors") and answer["data"]["result"], str(answer)[:2000]
    return answer["data"]


def wait_for_metric(backend, name: str, value: float, timeout_s: float = 120) -> None:
    """Poll /metrics until ``name`` reaches ``value`` (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while metric(backend, name) < value:
        assert time.monotonic() < deadline, f"{name} stayed at {metric(backend, name)}, expected {value}:\n" + \
            backend.log_text()[-4000:]
        time.sleep(0.2)


def test_a_click_prewarms_the_next_task_of_the_data_manager_tab_whose_first_click_is_a_cache_hit(
        label_studio, ls, images, start_backend):
    project_id = ls.create_project("e2e prewarm", SMART_CONFIG)
    task_ids = ls.import_images(project_id, [images["landscape"], images["portrait"], images["odd"]])
    ls.create_view(project_id, {"ordering": ["-tasks:id"]})  # the annotator's tab: newest task first
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token,
                            PREWARM_TASKS="2")
    with logs_on_failure(label_studio, backend):
        ml_id = connect(ls, project_id, backend, "grounded-sam prewarm")
        click(ls, ml_id, task_ids[2])  # the last by id, the first in the tab
        wait_for_metric(backend, "gsam_prewarmed_embeddings_total", 2)  # tasks 2 and 1, the tab's next ones
        hits, misses = (metric(backend, f"gsam_embedding_cache_{k}_total") for k in ("hits", "misses"))
        click(ls, ml_id, task_ids[1])
        assert metric(backend, "gsam_embedding_cache_hits_total") == hits + 1
        assert metric(backend, "gsam_embedding_cache_misses_total") == misses
        assert "pre-warming project" in backend.log_text()


def test_warm_command_and_prewarm_off(label_studio, ls, images, start_backend):
    project_id = ls.create_project("e2e warm command", SMART_CONFIG)
    task_ids = ls.import_images(project_id, [images["landscape"], images["portrait"], images["odd"]])
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token,
                            PREWARM_TASKS="0", BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret")
    with logs_on_failure(label_studio, backend):
        # LS's model connection form with basic auth (LS sends the credentials on every call)
        ml_id = ls.connect_ml_backend(project_id, backend.url, "warm", is_interactive=True, auth_method="BASIC_AUTH",
                                      basic_auth_user="ann", basic_auth_pass="s3cret")
        assert ls.ml_backend(ml_id).get("state") == "CO"
        env = {"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret", "PATH": "/usr/bin:/bin"}
        unauthenticated = requests.post(backend.url + "/warm", json={"project": project_id}, timeout=30)
        assert unauthenticated.status_code == 401
        done = subprocess.run([sys.executable, "-m", "backend", "warm", "--project", str(project_id), "--tasks", "2",
                               "--after", str(task_ids[0]), "--url", backend.url], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"project {project_id}: 2 embeddings encoded" in done.stdout
        click(ls, ml_id, task_ids[0])  # PREWARM_TASKS=0: this click warms nothing
        hits = metric(backend, "gsam_embedding_cache_hits_total")
        click(ls, ml_id, task_ids[2])
        assert metric(backend, "gsam_embedding_cache_hits_total") == hits + 1
        assert metric(backend, "gsam_prewarmed_embeddings_total") == 2
        assert "pre-warming project" in backend.log_text()
