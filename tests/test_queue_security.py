"""Queue mode against a hostile Redis writer, and Redis key hygiene.

Real redis-server, real worker process, real web process over HTTP. Jobs are pushed with raw Redis
commands, the way anyone who can write to Redis could, and must never run.
"""

from __future__ import annotations

import base64
import json
import pickle
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest
import redis

from backend.queue import liveness
import requests

from backend.queue import keys, liveness, transport
from tests.conftest import RedisServer, free_port
from tests.imageserver import ImageServer, make_jwt
from tests.test_http import CONFIG, body
from tests.test_protocol import png

IMAGE = "data:image/png;base64," + base64.b64encode(png(64, 48)).decode()


class Payload:
    """Unpickling this runs ``touch MARKER`` (the classic pickle gadget)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def stack(queue_stack, redis_server):
    web, worker = queue_stack
    return web, worker, redis.Redis.from_url(redis_server.url)


def push_raw_job(connection: redis.Redis, data: bytes, **fields: str) -> str:
    """Enqueue a job on ``interactive.grounded-sam`` the way RQ lays it out, with nothing but Redis commands."""
    job_id = f"hostile-{uuid.uuid4().hex[:8]}"
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    connection.hset(f"rq:job:{job_id}", mapping={
        "data": data, "created_at": now, "enqueued_at": now, "origin": "interactive.grounded-sam", "status": "queued",
        "description": "hostile", "timeout": "30", **fields})
    connection.sadd("rq:queues", "rq:queue:interactive.grounded-sam")
    connection.rpush("rq:queue:interactive.grounded-sam", job_id)
    return job_id


def wait_for_end(connection: redis.Redis, job_id: str, timeout_s: float = 60) -> transport.GsamJob:
    deadline = time.monotonic() + timeout_s
    while True:
        job = transport.fetch_job(job_id, connection)
        if job.get_status() in {"failed", "finished"}:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.get_status()}"
        time.sleep(0.2)


def assert_still_serves(web) -> None:
    response = requests.post(f"{web.url}/predict", json=body(IMAGE, prompt="cat"), timeout=90)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["result"]


def test_pickled_job_never_unpickles(stack, tmp_path):
    web, worker, connection = stack
    marker = tmp_path / "pickle-ran"
    gadget = pickle.dumps((Payload(marker), None, (), {}))
    compressed = push_raw_job(connection, zlib.compress(gadget))
    plain = push_raw_job(connection, gadget)
    for job_id in (compressed, plain):
        job = wait_for_end(connection, job_id)
        assert job.get_status() == "failed"
        assert "DeserializationError" in (job.latest_result().exc_string or "")
    assert not marker.exists(), "a pickled payload was unpickled by the worker"
    assert_still_serves(web)
    assert not marker.exists()


@pytest.mark.parametrize("func_name, args", [
    ("os.system", ["touch {marker}"]),
    ("subprocess.call", [["touch", "{marker}"]]),
    ("builtins.exec", ["open('{marker}', 'w').close()"]),
])
def test_json_job_naming_a_foreign_function_is_refused(stack, tmp_path, func_name, args):
    web, worker, connection = stack
    marker = tmp_path / "foreign-ran"
    args = json.loads(json.dumps(args).replace("{marker}", str(marker)))
    job_id = push_raw_job(connection, json.dumps([func_name, None, args, {}]).encode())
    job = wait_for_end(connection, job_id)
    assert job.get_status() == "failed"
    reason = job.latest_result().exc_string or ""
    assert "UnsafeJobError" in reason and "not a job function of this backend" in reason and func_name in reason
    assert not marker.exists(), f"{func_name} ran"
    assert_still_serves(web)


def test_our_function_on_an_instance_is_refused(stack):
    _, _, connection = stack
    job_id = push_raw_job(connection, json.dumps(["backend.queue.jobs.predict_job", "an instance", [{}], {}]).encode())
    assert "UnsafeJobError" in wait_for_end(connection, job_id).latest_result().exc_string


@pytest.mark.parametrize("run_id, tasks", [
    ("gsam:workers", [{"id": 1, "data": {}}]),  # a run id that would name another key
    ("x" * 100_000, [{"id": 1, "data": {}}]),
    ("0123456789abcdef", [{"id": i, "data": {}} for i in range(1, 2000)]),  # more than a chunk holds
    ("0123456789abcdef", [{"id": True, "data": "not an object"}]),
])
def test_a_forged_prelabel_chunk_with_bad_arguments_fails_before_touching_redis(stack, run_id, tasks):
    _, _, connection = stack
    spec = {"project": 1, "label_config": CONFIG, "prompt": None, "model_version": "v"}
    before = set(connection.scan_iter("gsam:run*"))
    job_id = push_raw_job(connection, json.dumps(
        ["backend.bulk.chunkjob.prelabel_chunk_job", None, [run_id, spec, tasks], {}]).encode())
    job = wait_for_end(connection, job_id)
    assert job.get_status() == "failed" and "ValueError" in (job.latest_result().exc_string or "")
    assert set(connection.scan_iter("gsam:run*")) == before  # no key named after the forged arguments


def test_callbacks_and_webhooks_in_a_job_are_ignored(stack):
    """A job of ours that names callbacks and webhooks: the job runs, they never do."""
    web, worker, connection = stack
    hooks = ImageServer(legacy_token="t", pat=make_jwt({"exp": time.time() + 60})).start()
    hooks.route("GET", "/hook", lambda handler, query: handler.send_bytes(200, b"ok", "text/plain"))
    try:
        payload = {"tasks": [{"id": 1, "data": {"image": IMAGE}}], "label_config": CONFIG, "context": None}
        job_id = push_raw_job(
            connection, json.dumps(["backend.queue.jobs.predict_job", None, [payload], {}]).encode(),
            success_callback_name="os.getcwd", failure_callback_name="os.getcwd",
            webhooks=json.dumps([{"url": hooks.url("/hook"), "job_status": status} for status in ("finished", "failed")]))
        job = wait_for_end(connection, job_id)
        assert job.get_status() == "finished" and job.latest_result().return_value[0]["result"]
        assert "/hook" not in hooks.paths()
        assert "ignoring its success callback 'os.getcwd'" in worker.log_text()
    finally:
        hooks.stop()


def test_metrics_listen_on_loopback_only(stack, metrics_port):
    """The worker's /metrics socket is bound to 127.0.0.1 (read from the kernel's socket table)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) == metrics_port:  # 0A = LISTEN
            listening.add(address)
    assert listening == {"0100007F"}, listening  # 127.0.0.1, little-endian hex
    assert requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).status_code == 200


def test_keys_of_served_jobs_and_liveness_expire(stack):
    web, _, connection = stack
    assert_still_serves(web)
    job_keys = connection.keys("rq:job:*")
    assert job_keys
    assert {key: connection.ttl(key) for key in job_keys if connection.ttl(key) == -1} == {}
    for key in connection.keys("gsam:*"):
        assert connection.ttl(key) != -1 or connection.pttl(key) != -1, key
    assert 0 < connection.ttl(keys.WORKERS) <= liveness.WORKERS_KEY_TTL_S


def register_stuck_worker(connection) -> None:
    """A worker that is live and registered for the default engine, but no process serves its queues."""
    stuck = "gsam-00000000000f"
    liveness.mark_alive(connection, stuck, ttl_s=120)
    liveness.register_worker(connection, stuck, liveness.WorkerInfo("grounded-sam", "grounding-dino+sam"))


def test_timed_out_predict_leaves_no_key_without_expiry_and_a_small_payload(tmp_path_factory, start_backend):
    """A registered worker that takes nothing: the job carries only what a worker needs, and after
    the 504 nothing is left unexpiring."""
    lonely = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("lonely")).start()
    try:
        connection = redis.Redis.from_url(lonely.url)
        register_stuck_worker(connection)
        web = start_backend(REDIS_URL=lonely.url, PREDICT_TIMEOUT="3")
        request = body(IMAGE, IMAGE, prompt="cat")
        request["tasks"][0].update(annotations=[{"result": ["x" * 1000]}], predictions=[{"result": []}], drafts=[])
        request["params"]["login"], request["params"]["password"] = "someone", "secret"
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(response=requests.post(
            f"{web.url}/predict", json=request, timeout=60)))
        thread.start()
        deadline = time.monotonic() + 30
        while not connection.keys("rq:job:*"):
            assert time.monotonic() < deadline, "no job was enqueued"
            time.sleep(0.05)
        (key,) = connection.keys("rq:job:*")
        func_name, instance, args, kwargs = json.loads(zlib.decompress(connection.hget(key, "data")))
        assert (func_name, instance, kwargs) == ("backend.queue.jobs.predict_job", None, {})
        assert args == [{"label_config": CONFIG, "context": request["params"]["context"], "prompt": None,
                         "tasks": [{"id": 1, "data": {"image": IMAGE}}, {"id": 2, "data": {"image": IMAGE}}]}]
        assert 0 < connection.ttl(key)  # a queued interactive job expires even if the web process dies
        thread.join(timeout=60)
        assert answer["response"].status_code == 504
        keys = {key.decode(): connection.ttl(key) for key in connection.keys("*")}
        assert not [k for k in keys if k.startswith("rq:job:")], keys  # unstarted jobs are deleted, not cancelled
        assert {k: ttl for k, ttl in keys.items() if k.startswith(("rq:job:", "gsam:")) and ttl == -1} == {}
        print("keys left after a timed-out /predict (name: ttl):", keys)
    finally:
        lonely.stop()


def test_web_process_never_unpickles_a_forged_result(tmp_path_factory, start_backend, tmp_path):
    """A pickled 'result' written for a pending job: /predict answers 502, the gadget never runs."""
    lonely = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("forged")).start()
    try:
        connection = redis.Redis.from_url(lonely.url)
        register_stuck_worker(connection)
        web = start_backend(REDIS_URL=lonely.url, PREDICT_TIMEOUT="20")
        marker = tmp_path / "web-unpickled"
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(response=requests.post(
            f"{web.url}/predict", json=body(IMAGE, prompt="cat"), timeout=60)))
        thread.start()
        deadline = time.monotonic() + 15
        while not connection.keys("rq:job:*"):
            assert time.monotonic() < deadline, "no job was enqueued"
            time.sleep(0.05)
        job_id = connection.keys("rq:job:*")[0].decode().removeprefix("rq:job:")
        connection.xadd(f"rq:results:{job_id}", {
            "type": 1, "worker_name": "forger",
            "return_value": base64.b64encode(pickle.dumps(Payload(marker))).decode()})
        thread.join(timeout=60)
        response = answer["response"]
        assert response.status_code == 502 and "unreadable" in response.json()["message"], response.text
        assert not marker.exists(), "the web process unpickled a result"
    finally:
        lonely.stop()


def test_warm_listener_drops_hostile_messages_survives_a_redis_restart_and_takes_the_next(tmp_path_factory):
    """Pre-warming's pub/sub channel is writable by anyone who can write to Redis: a bad message is
    dropped with its reason, never unpickled, and the listener keeps serving (also across a restart)."""
    from backend.pipeline.prewarm import WarmRequest
    from backend.queue.prewarm import MAX_MESSAGE_BYTES, WarmListener, publish_warm

    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("warm")).start()
    received: list[WarmRequest] = []
    listener = WarmListener(server.url, received.append).start()
    connection = redis.Redis.from_url(server.url)
    try:
        assert listener.subscribed.wait(10)
        hostile = [b"not json", b"[" * 500_000, b'"' + b"x" * (MAX_MESSAGE_BYTES + 1) + b'"', pickle.dumps({"project": 1}),
                   json.dumps({"project": 1, "after": None, "count": 500, "label_config": None}),
                   json.dumps({"project": True, "after": None, "count": 2, "label_config": None}),
                   json.dumps({"project": 1, "after": "7", "count": 2, "label_config": None}),
                   json.dumps({"project": 1, "after": None, "count": 2, "label_config": "<View>"}),
                   json.dumps([1, 2])]
        for message in hostile:
            assert connection.publish(keys.PREWARM_CHANNEL, message) == 1
        assert publish_warm(connection, WarmRequest(project=3, after=9, count=2)) == 1
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(r.project, r.after, r.count, r.config) for r in received] == [(3, 9, 2, None)]

        server.restart()
        connection = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 30  # the listener reconnects with backoff (1 s, 2 s, ...)
        while connection.pubsub_numsub(keys.PREWARM_CHANNEL) != [(keys.PREWARM_CHANNEL.encode(), 1)]:
            assert time.monotonic() < deadline, "the listener did not subscribe again after Redis restarted"
            time.sleep(0.1)
        assert publish_warm(connection, WarmRequest(project=4, after=None, count=1)) == 1
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(r.project, r.after) for r in received] == [(3, 9), (4, None)]
        assert connection.keys("gsam:*") == [], "pub/sub writes no key"
    finally:
        listener.stop()
        server.stop()
