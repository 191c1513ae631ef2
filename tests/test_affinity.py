"""Click affinity in queue mode: an image's interactive jobs go to the worker that owns it (rendezvous
hashing of the task over the engine's live workers), so its second request is an embedding-cache hit;
a busy or dead owner's work goes to any worker of the engine and no job is lost. Real Redis, real
worker processes on the tiny models."""

import base64
import os
import signal

import pytest
import redis as redis_py
import requests

from backend.queue import affinity, liveness
from backend.queue.jobs import predict_job
from backend.queue.transport import INTERACTIVE, engine_queue, queue, worker_queue
from tests.conftest import RedisServer, free_port
from tests.test_http import body
from tests.test_protocol import png

WORKERS = [f"gsam-{i:012x}" for i in range(4)]


def test_owners_are_stable_spread_and_move_only_from_a_leaving_worker():
    keys = [str(task) for task in range(1, 2001)]
    owners = {key: affinity.owner(key, WORKERS) for key in keys}
    assert owners == {key: affinity.owner(key, list(reversed(WORKERS))) for key in keys}  # order does not matter
    shares = [list(owners.values()).count(worker) for worker in WORKERS]
    assert min(shares) > 350 and max(shares) < 650, shares  # about 500 each
    gone = WORKERS[1]
    after = {key: affinity.owner(key, [w for w in WORKERS if w != gone]) for key in keys}
    moved = {key for key in keys if after[key] != owners[key]}
    assert moved == {key for key in keys if owners[key] == gone}  # only the leaver's tasks move
    assert affinity.owner("1", []) is None
    assert affinity.task_key(7) == "7" and affinity.task_key(True) is None and affinity.task_key("7") is None
    assert affinity.owns(WORKERS[0], None, WORKERS)  # a task without an id is everybody's


def test_route_sends_to_the_owner_unless_its_queue_is_long(tmp_path_factory):
    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("route")).start()
    try:
        connection = redis_py.Redis.from_url(server.url)
        owner = affinity.owner("5", WORKERS)
        shared = engine_queue(INTERACTIVE, "grounded-sam")
        assert affinity.route(connection, "grounded-sam", "5", WORKERS, 1) == worker_queue("grounded-sam", owner)
        assert affinity.route(connection, "grounded-sam", None, WORKERS, 1) == shared
        assert affinity.route(connection, "grounded-sam", "5", [], 1) == shared
        own = queue(worker_queue("grounded-sam", owner), connection)
        for _ in range(2):
            own.enqueue(predict_job, {}, ttl=60)
        assert affinity.route(connection, "grounded-sam", "5", WORKERS, 1) == shared  # 2 waiting > 1: busy owner
        assert affinity.route(connection, "grounded-sam", "5", WORKERS, 2) == own.name
    finally:
        server.stop()


def test_the_reaper_hands_a_dead_workers_waiting_jobs_to_the_shared_queue(tmp_path_factory):
    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("handover")).start()
    try:
        connection = redis_py.Redis.from_url(server.url)
        dead = "gsam-0000000000dd"  # never alive: its queue is a dead worker's
        own = queue(worker_queue("sam3", dead), connection)
        jobs = [own.enqueue(predict_job, {"n": i}, ttl=600) for i in range(3)]
        assert own.key.encode() in connection.smembers("rq:queues")
        liveness.requeue_abandoned(connection)
        shared = queue(engine_queue(INTERACTIVE, "sam3"), connection)
        assert shared.get_job_ids() == [job.id for job in jobs]  # in order, none lost
        assert own.count == 0 and own.key.encode() not in connection.smembers("rq:queues")  # forgotten
        assert all(shared.fetch_job(job.id).origin == shared.name for job in jobs)
    finally:
        server.stop()


# ---------------------------------------------------------------- two real workers

def task_request(task: int, prompt: str) -> dict:
    """A one-task interactive call (a typed prompt: LS sends a context) for task ``task``, whose
    image is its own (another size per task, so another embedding)."""
    uri = "data:image/png;base64," + base64.b64encode(png(40 + task, 30 + task)).decode()
    request = body(uri, prompt=prompt)
    request["tasks"][0]["id"] = task
    return request


def metric(port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.fixture(scope="module")
def pair(redis_server, start_worker, start_backend):
    """Two workers of one engine (each serving its metrics) and a web process on one Redis."""
    ports = [free_port(), free_port()]
    workers = [start_worker(redis_server.url, "--metrics-port", str(port)) for port in ports]
    web = start_backend(REDIS_URL=redis_server.url, PREDICT_TIMEOUT="90")
    return web, workers, ports


@pytest.mark.e2e
def test_the_second_request_on_an_image_is_a_cache_hit_on_its_owner(pair):
    web, _, ports = pair
    tasks = range(101, 109)
    for task in tasks:
        for prompt in ("cat", "dog"):  # the annotator asks twice about the same image
            answer = requests.post(f"{web.url}/predict", json=task_request(task, prompt), timeout=120)
            assert answer.status_code == 200, answer.text
    hits = sum(metric(port, "gsam_embedding_cache_hits_total") for port in ports)
    misses = sum(metric(port, "gsam_embedding_cache_misses_total") for port in ports)
    # one encoder call per task, on its owner; without affinity each second request has a 1/2
    # chance of the other worker (all 8 hitting would be a 1-in-256 accident)
    assert (hits, misses) == (len(tasks), len(tasks))
    assert all(metric(port, "gsam_embedding_cache_misses_total") > 0 for port in ports)  # both own some


@pytest.mark.e2e
def test_a_dead_owners_click_is_served_by_the_other_worker(pair, redis_server):
    web, workers, _ = pair
    connection = redis_py.Redis.from_url(redis_server.url)
    live = sorted(liveness.live_worker_info(connection))
    assert len(live) == 2
    frozen_name = live[0]
    task = next(t for t in range(200, 400) if affinity.owner(str(t), live) == frozen_name)
    frozen = next(w for w in workers if frozen_name in w.log_text())
    os.killpg(frozen.process.pid, signal.SIGKILL)  # no goodbye: it stays "live" until its entry lapses
    frozen.process.wait()
    answer = requests.post(f"{web.url}/predict", json=task_request(task, "cat"), timeout=120)
    assert answer.status_code == 200 and answer.json()["results"][0]["result"], answer.text
    # the job went to the dead owner's queue (still live for the web process) and waited there until
    # its liveness lapsed; the reaper then moved it to the shared queue, where the other worker took it
    other = next(w for w in workers if w is not frozen)
    assert "moved 1 waiting job(s) of a dead worker's queue" in other.log_text()
    assert liveness.live_worker_info(connection).keys() == {other_name for other_name in live if other_name != frozen_name}
