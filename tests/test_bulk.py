"""Bulk pre-labeling in queue mode, end to end: a real Label Studio, a real redis-server, real
worker processes and the real CLI / HTTP entry points. Every task must end with exactly one
prediction of the model version, through a worker killed with -9 and a Redis restart."""

import base64
import collections
import os
import signal
import subprocess
import sys
import time

import pytest
import redis as redis_py
import requests

from backend.bulk.redisstore import RedisRunStore
from tests.conftest import REPO, RedisServer, free_port
from tests.test_http import CONFIG
from tests.test_protocol import png

pytestmark = pytest.mark.e2e
MODEL_VERSION = "grounding-dino+sam"


def image_uri(i: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(40 + i % 7, 30 + i % 5)).decode()




def make_project(ls, title: str, count: int) -> int:
    project = ls.create_project(title, CONFIG)
    ls.import_tasks(project, [{"image": image_uri(i)} for i in range(count)])
    return project


def predictions_per_task(ls, project: int) -> collections.Counter:
    """task id -> number of predictions of MODEL_VERSION (one LS call per page)."""
    counts: collections.Counter = collections.Counter()
    page = 1
    while True:
        response = ls.request("GET", f"/api/predictions/?project={project}&page={page}&page_size=500",
                              expect=(200, 404))
        if response.status_code == 404:
            break
        body = response.json()
        items = body["results"] if isinstance(body, dict) else body
        counts.update(p["task"] for p in items if p["model_version"] == MODEL_VERSION)
        if not isinstance(body, dict) or not body.get("next"):
            break
        page += 1
    return counts


def task_ids(ls, project: int) -> set[int]:
    return {task["id"] for task in ls.tasks(project)}


def worker_env(label_studio) -> dict:
    return {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token}


def prelabel_cli(tiny_env: dict, redis_url: str, label_studio, project: int, *extra: str):
    """The CLI as an admin runs it; the same model env as the workers, so the model versions agree."""
    env = {**os.environ, **tiny_env, "REDIS_URL": redis_url, **worker_env(label_studio)}
    return subprocess.Popen([sys.executable, "-m", "backend", "prelabel", "--project", str(project), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def cluster(redis_server, start_worker, start_backend, label_studio):
    """Two workers and the web API on one Redis, all pointed at the session's Label Studio. No basic
    auth, so LS connects as it does by default: the bulk routes need the documented opt-in."""
    workers = [start_worker(redis_server.url, **worker_env(label_studio)) for _ in range(2)]
    web = start_backend(REDIS_URL=redis_server.url, ALLOW_UNAUTHENTICATED_BULK="true", **worker_env(label_studio))
    return web, workers


def wait_for_run(web_url: str, run_id: str, until, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = requests.get(f"{web_url}/jobs/{run_id}", timeout=5).json()
        if until(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not get there in {timeout_s} s: {status}")


def test_cancel_then_resume(cluster, ls, label_studio, redis_server, tiny_env):
    web, _ = cluster
    project = make_project(ls, "bulk cancel", 120)
    run_id = requests.post(f"{web.url}/prelabel", json={"project": project, "chunk": 4}, timeout=30).json()["id"]
    wait_for_run(web.url, run_id, lambda s: s["done"] >= 8)
    cancelled = requests.delete(f"{web.url}/jobs/{run_id}", timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    time.sleep(3)  # chunks already running finish their current task at most
    settled = predictions_per_task(ls, project)
    assert 8 <= sum(settled.values()) < 120
    time.sleep(2)
    assert predictions_per_task(ls, project) == settled, "a cancelled run kept writing"
    assert requests.get(f"{web.url}/jobs/nope", timeout=5).status_code == 404
    # the chunks no worker had started are deleted, not cancelled: RQ keeps a cancelled job's payload forever
    connection = redis_py.Redis.from_url(redis_server.url, socket_timeout=5)
    assert connection.zcard("rq:canceled:prelabel") == 0
    assert not [key for key in connection.scan_iter("rq:job:*") if connection.ttl(key) == -1]

    resumed = prelabel_cli(tiny_env, redis_server.url, label_studio, project, "--chunk", "8")
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output
    counts = predictions_per_task(ls, project)
    assert set(counts) == task_ids(ls, project) and set(counts.values()) == {1}


def test_a_run_outlives_the_web_process_that_started_it(cluster, start_backend, ls, label_studio, redis_server):
    """POST /prelabel, then SIGKILL the web process mid-run and start none: the workers adopt the run
    (its lease expires), finish it, and every key it left in Redis expires."""
    _, workers = cluster
    auth = ("bulk-admin", "s3cret-pass")
    web = start_backend(REDIS_URL=redis_server.url, BASIC_AUTH_USER=auth[0], BASIC_AUTH_PASS=auth[1],
                        **worker_env(label_studio))
    project = make_project(ls, "bulk orphaned", 60)
    started = requests.post(f"{web.url}/prelabel", json={"project": project, "chunk": 4}, auth=auth, timeout=30)
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    connection = redis_py.Redis.from_url(redis_server.url, socket_timeout=5)
    store = RedisRunStore(connection)
    deadline = time.monotonic() + 120
    while (store.status(run_id) is None or store.status(run_id).done < 8) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(web.process.pid, signal.SIGKILL)  # mid-run: its supervisor thread dies with it
    web.process.wait()
    assert store.status(run_id).status == "running" and store.status(run_id).done < 60

    deadline = time.monotonic() + 240
    while store.state(run_id) == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    final = store.status(run_id)
    assert (final.status, final.done, final.failed) == ("done", 60, 0), final
    counts = predictions_per_task(ls, project)
    assert set(counts) == task_ids(ls, project) and set(counts.values()) == {1}
    assert any(f"run {run_id}" in w.log_text() and "adopting it" in w.log_text() for w in workers)

    ttls = {key.decode(): connection.ttl(key) for key in connection.scan_iter("gsam:*")}
    assert f"gsam:run:{run_id}" in ttls and "gsam:workers" in ttls and "gsam:worker-info" in ttls
    assert not {key: ttl for key, ttl in ttls.items() if ttl <= 0 and ttl != -2}, ttls  # -2: expired meanwhile


def test_the_run_takes_its_model_version_from_the_workers(tmp_path_factory, start_worker, ls, label_studio,
                                                          tiny_env):
    redis = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("versions")).start()
    try:
        start_worker(redis.url, **worker_env(label_studio))
        other = start_worker(redis.url, MODEL_VERSION="other-version", **worker_env(label_studio))
        project = make_project(ls, "bulk versions", 12)
        # the admin's shell has no model settings: the CLI asks the workers
        env = {k: v for k, v in os.environ.items() if k not in {*tiny_env, "MODEL_VERSION"}}
        env.update(REDIS_URL=redis.url, **worker_env(label_studio))

        def cli(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project), *extra],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=240)

        refused = cli()
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"{MODEL_VERSION!r}" in refused.stderr and "'other-version'" in refused.stderr, refused.stderr
        unknown = cli("--model-version", "nobody-serves-this")
        assert unknown.returncode == 2 and "'other-version'" in unknown.stderr, unknown.stderr
        assert predictions_per_task(ls, project) == collections.Counter()

        other.stop()  # one version left among the live workers
        done = cli("--chunk", "4")
        assert done.returncode == 0, done.stdout + done.stderr
        counts = predictions_per_task(ls, project)
        assert set(counts) == task_ids(ls, project) and set(counts.values()) == {1}
    finally:
        redis.stop()


def test_label_studio_retrieve_predictions_in_queue_mode(cluster, ls):
    """LS's own Data Manager action: one synchronous /predict for all tasks, split across workers."""
    web, _ = cluster
    project = make_project(ls, "retrieve via queue", 12)
    ml_backend = ls.connect_ml_backend(project, web.url, "queue mode", is_interactive=True)
    assert ml_backend
    ls.retrieve_predictions(project)
    counts = predictions_per_task(ls, project)
    assert set(counts) == task_ids(ls, project) and set(counts.values()) == {1}


def test_bulk_run_survives_a_killed_worker_and_health_stays_fast(cluster, ls, label_studio, redis_server, tiny_env):
    web, workers = cluster
    project = make_project(ls, "bulk 200", 200)
    started = requests.post(f"{web.url}/prelabel", json={"project": project, "chunk": 8}, timeout=30)
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    wait_for_run(web.url, run_id, lambda s: s["done"] >= 24)
    os.killpg(workers[0].process.pid, signal.SIGKILL)  # mid-run, mid-chunk
    health = requests.get(f"{web.url}/health", timeout=1)  # answers within 1 s while workers are busy
    assert health.status_code == 200 and health.json()["redis"] == "ok"
    final = wait_for_run(web.url, run_id, lambda s: s["status"] in {"done", "cancelled"})
    assert final["status"] == "done" and final["done"] == 200 and final["failed"] == 0, final
    counts = predictions_per_task(ls, project)
    assert set(counts) == task_ids(ls, project) and set(counts.values()) == {1}

    # A second run finds nothing to do and writes nothing.
    again = prelabel_cli(tiny_env, redis_server.url, label_studio, project)
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0, output
    assert predictions_per_task(ls, project) == counts


def test_redis_restart_mid_run_completes(tmp_path_factory, start_worker, ls, label_studio, tiny_env):
    redis = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("restart")).start()
    try:
        start_worker(redis.url, **worker_env(label_studio))
        project = make_project(ls, "bulk restart", 80)
        run = prelabel_cli(tiny_env, redis.url, label_studio, project, "--chunk", "4")
        counts = collections.Counter()
        deadline = time.monotonic() + 120
        while sum(counts.values()) < 12 and time.monotonic() < deadline:
            time.sleep(0.5)
            counts = predictions_per_task(ls, project)
        redis.restart(down_s=2)
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
        counts = predictions_per_task(ls, project)
        assert set(counts) == task_ids(ls, project) and set(counts.values()) == {1}, output
    finally:
        redis.stop()


def test_health_answers_while_redis_is_down(cluster, redis_server):
    web, _ = cluster
    redis_server.stop()
    try:
        health = requests.get(f"{web.url}/health", timeout=1)
        assert health.status_code == 200 and health.json()["status"] == "DEGRADED"
    finally:
        redis_server.start()
