"""Pre-warmed next tasks in queue mode, end to end: a real Label Studio 1.23, a real redis-server,
the web process and an RQ worker as real subprocesses. After the annotator's click on task 1 the web
process broadcasts a warm request; the worker (which reads the tasks from LS) encodes the next tasks
into its own embedding cache between jobs, so the first click on task 2 is a cache hit in the worker.
``python -m backend warm`` reaches the workers the same way. Run: ``pytest -m e2e tests/test_e2e_prewarm_queue.py``."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import RedisServer, free_port
from tests.test_e2e_label_studio import SMART_CONFIG, connect, images, logs_on_failure  # noqa: F401 (fixture)
from tests.test_e2e_prewarm import REPO, click

pytestmark = pytest.mark.e2e


def worker_metric(port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for_worker_metric(port: int, name: str, value: float, worker, timeout_s: float = 120) -> None:
    """Poll the worker's /metrics until ``name`` reaches ``value`` (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while worker_metric(port, name) < value:
        assert time.monotonic() < deadline, f"{name} stayed at {worker_metric(port, name)}, expected {value}:\n" + \
            worker.log_text()[-4000:]
        time.sleep(0.2)


def test_queue_mode_click_on_task_1_prewarms_task_2_in_the_worker(label_studio, ls, images, redis_server,
                                                                 start_worker, start_backend, metrics_port):
    project_id = ls.create_project("e2e prewarm (queue)", SMART_CONFIG)
    task_ids = ls.import_images(project_id, [images["landscape"], images["portrait"], images["odd"]])
    credentials = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token}
    worker = start_worker(redis_server.url, "--metrics-port", str(metrics_port), **credentials)
    # the /warm route's basic auth is tested in embedded mode (test_e2e_prewarm)
    web = start_backend(REDIS_URL=redis_server.url, PREDICT_TIMEOUT="60", PREWARM_TASKS="1",
                        ALLOW_UNAUTHENTICATED_BULK="true")
    with logs_on_failure(label_studio, web):
        assert "pre-warming off" not in worker.log_text()
        ml_id = connect(ls, project_id, web, "grounded-sam prewarm (queue)")
        click(ls, ml_id, task_ids[0])
        wait_for_worker_metric(metrics_port, "gsam_prewarmed_embeddings_total", 1, worker)  # task 2
        hits, misses = (worker_metric(metrics_port, f"gsam_embedding_cache_{k}_total") for k in ("hits", "misses"))
        click(ls, ml_id, task_ids[1])
        assert worker_metric(metrics_port, "gsam_embedding_cache_hits_total") == hits + 1
        assert worker_metric(metrics_port, "gsam_embedding_cache_misses_total") == misses

        # on demand: the web process has no LS credentials; the worker reads the label config from LS
        done = subprocess.run([sys.executable, "-m", "backend", "warm", "--project", str(project_id), "--tasks", "1",
                               "--after", str(task_ids[1]), "--url", web.url], cwd=REPO,
                              env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"project {project_id}: sent to 1 worker(s)" in done.stdout
        wait_for_worker_metric(metrics_port, "gsam_prewarmed_embeddings_total", 2, worker)  # task 3
        hits = worker_metric(metrics_port, "gsam_embedding_cache_hits_total")
        click(ls, ml_id, task_ids[2])
        assert worker_metric(metrics_port, "gsam_embedding_cache_hits_total") == hits + 1
        assert "pre-warming project" in worker.log_text()


def test_queue_mode_warm_without_a_listening_worker_is_503(tmp_path_factory, start_backend):
    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("no-workers")).start()
    try:
        web = start_backend(REDIS_URL=server.url, PREDICT_TIMEOUT="5", ALLOW_UNAUTHENTICATED_BULK="true")
        answer = requests.post(web.url + "/warm", json={"project": 1, "tasks": 2}, timeout=30)
        assert answer.status_code == 503 and "no worker is listening" in answer.json()["message"], answer.text
    finally:
        server.stop()


def test_with_two_workers_each_task_is_prewarmed_once_by_its_owner(label_studio, ls, tmp_path_factory,
                                                                  start_worker, start_backend):
    """Click affinity: the warm request reaches both workers, each encodes only the tasks it owns,
    so every task is encoded once (not once per worker), and each click lands where it was encoded."""
    from PIL import Image

    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("two-owners")).start()
    try:
        folder = tmp_path_factory.mktemp("owned-images")
        paths = []
        for i in range(8):  # distinct sizes: distinct bytes, distinct embeddings
            path = folder / f"owned{i}.png"
            Image.new("RGB", (120 + 9 * i, 90 + 5 * i), (30 * i, 200, 120)).save(path)
            paths.append(path)
        project_id = ls.create_project("e2e prewarm (two owners)", SMART_CONFIG)
        task_ids = ls.import_images(project_id, paths)
        credentials = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token}
        ports = [free_port(), free_port()]
        workers = [start_worker(server.url, "--metrics-port", str(port), **credentials) for port in ports]
        web = start_backend(REDIS_URL=server.url, PREDICT_TIMEOUT="60", ALLOW_UNAUTHENTICATED_BULK="true")
        with logs_on_failure(label_studio, web):
            ml_id = connect(ls, project_id, web, "grounded-sam prewarm (two owners)")
            answer = requests.post(f"{web.url}/warm", json={"project": project_id, "tasks": len(task_ids)}, timeout=30)
            assert answer.status_code == 200 and answer.json()["workers"] == 2, answer.text
            deadline = time.monotonic() + 180
            while not all(f"pre-warming project {project_id}:" in w.log_text() for w in workers):
                assert time.monotonic() < deadline, [w.log_text()[-2000:] for w in workers]
                time.sleep(0.3)

            def total(name: str) -> float:
                return sum(worker_metric(port, name) for port in ports)

            assert total("gsam_prewarmed_embeddings_total") == len(task_ids)  # once each, not once per worker
            hits, misses = total("gsam_embedding_cache_hits_total"), total("gsam_embedding_cache_misses_total")
            for task in task_ids:
                click(ls, ml_id, task)
            assert total("gsam_embedding_cache_misses_total") == misses  # every click on its owner's embedding
            assert total("gsam_embedding_cache_hits_total") == hits + len(task_ids)
    finally:
        server.stop()
