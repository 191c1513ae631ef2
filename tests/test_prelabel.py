"""Bulk pre-labeling (backend/bulk/: prelabel, the run stores, runs, supervisor, adopt; backend/ls/client.py)
against a real Label Studio 1.23.

The session's LS server (the ``label_studio`` fixture of tests/conftest.py, shared with the other
LS-backed modules: every test makes projects of its own), the tiny models, and a redis-server of the
test's own (the ``redis_server`` fixture of tests/conftest.py). Images are small generated PNGs
imported as ``data:`` URIs; a *poison* task carries bytes that are no image.

Queue-mode supervision is tested twice: with an in-process stand-in for the RQ queue injected as
the runs' ``ChunkQueue`` (lost jobs, a Redis restart, Ctrl-C: deterministic and fast), and end to end with a real
``python -m backend worker`` through a Redis restart.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import redis
from PIL import Image, ImageDraw

from backend.bulk.adopt import adopt_orphaned_runs
from backend.bulk.memorystore import MemoryRunStore
from backend.bulk.prelabel import plan_prelabel, plan_tasks_to_label, process_chunk
from backend.bulk.redisstore import RedisRunStore
from backend.bulk.request import RunRequest
from backend.bulk.runs import EmbeddedRuns, QueueRuns
from backend.bulk.spec import BulkTask, PrelabelSpec
from backend.bulk.status import RunState
from backend.bulk.writelock import WriteLockTimeout
from backend.ls.client import LabelStudioApi, LabelStudioApiError, parse_model_versions
from backend.pipeline.predict import Pipeline, TaskOutcome
from backend.queue import keys
from backend.queue.connection import connect
from backend.settings import DEFAULT_BATCH_SIZE
from tests.conftest import REPO
from tests.test_e2e_label_studio import LABEL_CONFIG

pytestmark = pytest.mark.e2e

CANCELLED, DONE, PLANNING, RUNNING = RunState.CANCELLED, RunState.DONE, RunState.PLANNING, RunState.RUNNING
CONFIG = LABEL_CONFIG  # the README's project config (dog has the aliases "puppy, hound")

POISON = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n but the rest is garbage").decode()


def png_uri(i: int) -> str:
    w, h = (64, 48) if i % 2 else (40, 56)
    img = Image.new("RGB", (w, h), (37 * i % 256, 90, 160))
    ImageDraw.Draw(img).ellipse([4, 4, w // 2 + i % 7, h // 2], fill=(220, 120, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def settings(tiny_settings, label_studio):
    return dataclasses.replace(tiny_settings, label_studio_url=label_studio.url,
                               label_studio_api_key=label_studio.legacy_token, redis_url=None)


@pytest.fixture(scope="module")
def pipeline(settings):
    return Pipeline(settings)


@pytest.fixture(scope="module")
def api(label_studio):
    with LabelStudioApi(label_studio.url, label_studio.legacy_token) as client:
        yield client


def make_project(ls, title: str, n_good: int, n_poison: int = 0) -> tuple[int, list[int], list[int]]:
    """(project id, good task ids, poison task ids); poison tasks are interleaved."""
    pid = ls.create_project(title, CONFIG)
    kinds = ["good"] * n_good
    for k in range(n_poison):
        kinds.insert(min(len(kinds), 5 + 11 * k), "poison")
    tasks = [{"data": {"image": POISON if kind == "poison" else png_uri(i)}} for i, kind in enumerate(kinds)]
    ids = ls.import_tasks(pid, tasks)
    good = [t for t, kind in zip(ids, kinds) if kind == "good"]
    poison = [t for t, kind in zip(ids, kinds) if kind == "poison"]
    return pid, good, poison


def stored(ls, task_ids) -> dict[int, list[dict]]:
    """The predictions LS holds for ``task_ids`` (one request for the whole project)."""
    project = ls.task(task_ids[0])["project"]
    by_task: dict[int, list[dict]] = {t: [] for t in task_ids}
    for prediction in ls.get("/api/predictions/", params={"project": project}):
        if prediction["task"] in by_task:
            by_task[prediction["task"]].append(prediction)
    return by_task


def versions_by_task(ls, task_ids) -> dict[int, Counter]:
    return {t: Counter(p["model_version"] for p in preds) for t, preds in stored(ls, task_ids).items()}


def prediction_ids(ls, task_ids, model_version) -> dict[int, list[int]]:
    return {t: sorted(p["id"] for p in preds if p["model_version"] == model_version)
            for t, preds in stored(ls, task_ids).items()}


def assert_one_each(ls, good, poison, model_version):
    versions = versions_by_task(ls, good + poison)
    for task_id in good:
        assert versions[task_id][model_version] == 1, f"task {task_id}: {dict(versions[task_id])}"
    for task_id in poison:
        assert versions[task_id][model_version] == 0, f"poison task {task_id} got one: {dict(versions[task_id])}"


# ---------------------------------------------------------------------------------------- embedded
def run_embedded(settings, pipeline, project: int, *, progress: bool = False, **request):
    """``python -m backend prelabel`` without REDIS_URL, on the test's pipeline."""
    return EmbeddedRuns(settings, pipeline).run(RunRequest(project=project, **request), progress=progress)


def test_embedded_run_labels_each_task_once_isolates_poison_and_resumes(ls, settings, pipeline, capsys):
    pid, good, poison = make_project(ls, "prelabel embedded", n_good=28, n_poison=2)
    mv = pipeline.model_version
    # a prediction of another model version is neither a reason to skip nor touched by --redo
    ls.post(f"/api/projects/{pid}/import/predictions",
            json=[{"task": good[0], "result": [], "score": 0.1, "model_version": "someone-else"}])

    first = run_embedded(settings, pipeline, pid, chunk=8, progress=True)
    assert (first.status, first.total, first.done, first.failed, first.skipped) == (DONE, 30, 28, 2, 0), first
    assert first.remaining == 0 and first.eta_seconds == 0.0 and first.images_per_second > 0
    assert sorted(first.failures) == sorted(poison)
    assert all("not an image" in reason or "corrupt" in reason for reason in first.failures.values()), first.failures
    json.dumps(first.to_json())  # JSON-safe for GET /jobs/<id>
    bar = capsys.readouterr().err
    assert "failed=2" in bar and "remaining=0" in bar and "img/s" in bar, bar[-500:]
    assert_one_each(ls, good, poison, mv)
    assert versions_by_task(ls, [good[0]])[good[0]]["someone-else"] == 1
    regions = ls.predictions(good[1])[0]["result"]
    assert regions and {r["type"] for r in regions} == {"rectanglelabels", "brushlabels"}
    before = prediction_ids(ls, good, mv)

    # running again resumes: only the two poison tasks are tried again, nothing new is written
    second = run_embedded(settings, pipeline, pid, chunk=8, progress=False)
    assert (second.status, second.total, second.done, second.failed, second.skipped) == (DONE, 2, 0, 2, 28)
    assert prediction_ids(ls, good, mv) == before
    assert_one_each(ls, good, poison, mv)

    # --redo replaces: still exactly one prediction of this version per task, a new one
    redo = run_embedded(settings, pipeline, pid, prompt="cat . puppy", chunk=16, redo=True, progress=False)
    assert (redo.status, redo.total, redo.done, redo.failed, redo.skipped) == (DONE, 30, 28, 2, 0)
    after = prediction_ids(ls, good, mv)
    assert all(set(after[t]).isdisjoint(before[t]) for t in good), (before, after)
    assert_one_each(ls, good, poison, mv)
    assert versions_by_task(ls, [good[0]])[good[0]]["someone-else"] == 1


class ScriptedPipeline:
    """A pipeline stand-in: a fixed prediction per task, after a barrier so racing callers overlap."""

    def __init__(self, model_version: str, parties: int = 1):
        self.model_version = model_version
        self.barrier = threading.Barrier(parties)

    def batch_size(self) -> int:
        return DEFAULT_BATCH_SIZE

    def predict_outcomes(self, request):
        self.barrier.wait(timeout=30)
        return [TaskOutcome({"result": [], "score": 0.5, "model_version": self.model_version})
                for _ in request.tasks]


def race(n: int, fn) -> None:
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_write_back_is_idempotent_when_chunks_repeat_or_race(ls, api, settings, pipeline, redis_server):
    pid, good, _ = make_project(ls, "prelabel idempotency", n_good=4)
    mv = pipeline.model_version
    spec = PrelabelSpec(project=pid, label_config=CONFIG, prompt=None, model_version=mv, redo=False)
    chunk = plan_tasks_to_label(api, pid, mv, redo=False)
    assert [t.id for t in chunk] == good

    # the same chunk twice in one run (an RQ retry): one prediction each, counted once
    memory = MemoryRunStore()
    run_id = memory.create(spec, good)
    process_chunk(pipeline, api, memory, run_id, spec, chunk)
    process_chunk(pipeline, api, memory, run_id, spec, chunk)
    assert (memory.status(run_id).done, memory.pending(run_id)) == (4, [])
    assert_one_each(ls, good, [], mv)
    first = prediction_ids(ls, good, mv)

    store = RedisRunStore(redis.Redis.from_url(redis_server.url))
    # another run over the same tasks (a planner that raced a writer): LS's prediction is kept
    run_id = store.create(spec, good)
    race(2, lambda: process_chunk(ScriptedPipeline(mv), api, store, run_id, spec, chunk))
    assert store.status(run_id).done == 4 and prediction_ids(ls, good, mv) == first

    # redo, two workers racing on the same chunk of one run: replaced once, exactly one left
    redo = dataclasses.replace(spec, redo=True)
    run_id = store.create(redo, good)
    scripted = ScriptedPipeline(mv, parties=2)
    race(2, lambda: process_chunk(scripted, api, store, run_id, redo, chunk))
    second = prediction_ids(ls, good, mv)
    assert all(len(second[t]) == 1 and second[t] != first[t] for t in good), (first, second)
    assert store.status(run_id).done == 4

    # a worker serving another model version writes nothing and says why
    run_id = store.create(redo, good)
    process_chunk(ScriptedPipeline("other-version"), api, store, run_id, redo, chunk)
    status = store.status(run_id)
    assert status.failed == 4 and "model_version" in status.failures[good[0]]
    assert prediction_ids(ls, good, mv) == second


class CancelAtSecondBatch:
    """The real pipeline; the run is cancelled when the chunk asks for its second batch."""

    def __init__(self, pipeline, store, run_id):
        self.pipeline, self.store, self.run_id, self.calls = pipeline, store, run_id, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def predict_outcomes(self, request):
        self.calls.append([t["id"] for t in request.tasks])
        if len(self.calls) == 2:
            self.store.cancel(self.run_id)
        return self.pipeline.predict_outcomes(request)


def test_a_chunk_writes_each_batch_before_labeling_the_next(ls, api, settings, pipeline):
    pid, good, _ = make_project(ls, "prelabel batches", n_good=10)
    mv = pipeline.model_version
    spec = PrelabelSpec(project=pid, label_config=CONFIG, prompt=None, model_version=mv, redo=False)
    chunk = plan_tasks_to_label(api, pid, mv, redo=False)
    store = MemoryRunStore()
    run_id = store.create(spec, good)
    scripted = CancelAtSecondBatch(pipeline, store, run_id)
    process_chunk(scripted, api, store, run_id, spec, chunk)
    batch = settings.batch_size  # 4 (tiny_env BATCH_SIZE)
    assert scripted.calls == [good[:batch], good[batch:2 * batch]]
    # the first batch was written before the second ran; the run was cancelled before the second's writes
    assert versions_by_task(ls, good) == {t: Counter({mv: 1}) if t in good[:batch] else Counter() for t in good}
    assert store.status(run_id).done == batch and store.state(run_id) == CANCELLED


# ---------------------------------------------------------------------------------------- run stores
@pytest.fixture(params=["memory", "redis"])
def store(request, redis_server):
    if request.param == "memory":
        return MemoryRunStore()
    connection = redis.Redis.from_url(redis_server.url)
    return RedisRunStore(connection)


def test_run_store_counts_each_task_once(store):
    spec = PrelabelSpec(project=7, label_config=CONFIG, prompt="cat", model_version="mv-1", redo=False)
    run_id = store.create(spec, [1, 2, 3, 4, 5], skipped=3)
    assert store.state(run_id) == RUNNING and run_id in store.run_ids()
    assert store.mark_done(run_id, 1) and not store.mark_done(run_id, 1)  # re-processing never double-counts
    assert store.mark_failed(run_id, 2, "bad image")
    assert not store.mark_failed(run_id, 2, "bad image again")
    assert store.mark_failed(run_id, 3, "transient") and store.mark_done(run_id, 3)  # a retry that worked
    assert not store.mark_failed(run_id, 1, "late duplicate failure")  # done stays done
    assert store.done_among(run_id, [1, 2, 3, 9]) == {1, 3} and store.is_done(run_id, 3)
    assert store.pending(run_id) == [4, 5]
    status = store.status(run_id)
    assert (status.total, status.done, status.failed, status.remaining, status.skipped) == (5, 2, 1, 2, 3)
    assert status.failures == {2: "bad image again"} and status.model_version == "mv-1" and status.project == 7
    body = json.loads(json.dumps(status.to_json()))
    assert body["failures"] == {"2": "bad image again"} and body["remaining"] == 2 and body["status"] == RUNNING
    assert set(body) >= {"id", "project", "status", "total", "done", "failed", "remaining", "images_per_second",
                         "eta_seconds", "failures", "model_version"}

    assert store.cancel(run_id) and store.is_cancelled(run_id) and not store.cancel(run_id)
    store.finish(run_id)  # a cancelled run stays cancelled
    assert store.status(run_id).status == CANCELLED
    assert store.status("no-such-run") is None and store.state("no-such-run") is None
    assert not store.mark_done("no-such-run", 1)

    other = store.create(spec, None)  # POST /prelabel: the run exists while its tasks are listed
    assert store.status(other).status == PLANNING and store.status(other).eta_seconds is None
    store.set_tasks(other, [10, 11], skipped=1)
    assert (store.state(other), store.pending(other)) == (RUNNING, [10, 11])
    store.mark_done(other, 10)
    store.mark_done(other, 11)
    store.finish(other)
    assert store.status(other).status == DONE


def test_write_lock_is_exclusive(store):
    with store.write_lock(7, 1, "mv-1"):
        with pytest.raises(WriteLockTimeout):
            with store.write_lock(7, 1, "mv-1", wait=0.2):
                pass
        with store.write_lock(7, 1, "mv-2", wait=0.2):  # another version, another lock
            pass
    with store.write_lock(7, 1, "mv-1", wait=0.2):  # released
        pass
    # a retry after Redis went away mid-write takes over its own attempt's lock, nobody else can
    stale = store.write_lock(7, 3, "mv-1", owner="attempt-1")
    stale.__enter__()  # never left: as if Redis went away before the release
    with pytest.raises(WriteLockTimeout):
        with store.write_lock(7, 3, "mv-1", wait=0.2, owner="attempt-2"):
            pass
    with store.write_lock(7, 3, "mv-1", wait=0.2, owner="attempt-1"):
        pass
    with store.write_lock(7, 3, "mv-1", wait=0.2, owner="attempt-2"):
        pass
    with store.write_lock(7, 4, "mv-1", ttl=0.4) as lock:  # a live holder refreshes its lock
        for _ in range(3):
            time.sleep(0.2)
            lock.refresh()
            with pytest.raises(WriteLockTimeout):
                with store.write_lock(7, 4, "mv-1", wait=0):
                    pass
    if isinstance(store, RedisRunStore):
        with store.write_lock(7, 5, "mv-1", ttl=0.2) as lock:  # held past its TTL: refresh says so
            time.sleep(0.3)
            with pytest.raises(WriteLockTimeout):
                lock.refresh()
    if isinstance(store, RedisRunStore):  # a holder that died: its lock expires after the TTL
        store.connection.set(keys.write_lock_key(7, 2, "mv-1"), "dead-worker", px=300)
        started = time.monotonic()
        with store.write_lock(7, 2, "mv-1", wait=5):
            assert time.monotonic() - started >= 0.2


# ---------------------------------------------------------------------------------------- listing
def test_iter_tasks_pages_by_id_without_prediction_results(ls, api):
    pid = ls.create_project("prelabel pagination", CONFIG)
    ids = ls.import_tasks(pid, [{"data": {"image": f"http://example.com/{i}.png"}} for i in range(250)])
    expected = {t: set() for t in ids}
    predictions = []
    for i, task_id in enumerate(ids):
        versions = (["v1"] if i % 3 == 0 else []) + (["v2"] if i % 5 == 0 else []) + (["a,b"] if i % 7 == 0 else [])
        for version in versions:
            predictions.append({"task": task_id, "result": [], "model_version": version})
            expected[task_id].add(version)
    many = [f"a-rather-long-model-version-{k:03d}" for k in range(25)]  # > 500 characters joined
    predictions += [{"task": ids[100], "result": [], "model_version": v} for v in many]
    expected[ids[100]] |= set(many)
    ls.post(f"/api/projects/{pid}/import/predictions", json=predictions)

    requests_made = []
    api._client._client_wrapper.httpx_client.httpx_client.event_hooks["request"].append(
        lambda request: requests_made.append(request.url.path))
    pages = api.iter_tasks(pid, page_size=100)
    first = next(pages)
    assert first.id == ids[0] and requests_made.count("/api/tasks/") == 1  # lazy: one page at a time
    refs = [first, *pages]
    assert [r.id for r in refs] == ids  # each task once, ascending
    assert requests_made.count("/api/tasks/") == 3  # pages of 100, 100, 50
    assert requests_made.count("/api/dm/columns") == 1
    assert requests_made.count("/api/predictions/") == 1  # the task whose version list LS capped
    for ref in refs:
        want = {p for v in expected[ref.id] for p in (v.split(",") if "," in v else [v])}
        if ref.id == ids[100]:
            want = expected[ref.id]  # read exactly from /api/predictions
        assert set(ref.model_versions) == want, ref
        assert ref.data == {"image": f"http://example.com/{ids.index(ref.id)}.png"}
    assert refs[0].has_version("v1") and not refs[1].has_version("v1")
    assert refs[0].has_version("a,b") is None  # split by LS's comma-joining: the planner asks LS

    plan = plan_prelabel(api, pid, "v1", redo=False, page_size=100)
    assert [t.id for t in plan.tasks] == [t for i, t in enumerate(ids) if i % 3] and plan.skipped == 84
    plan = plan_prelabel(api, pid, "a,b", redo=False, page_size=100)
    assert [t.id for t in plan.tasks] == [t for i, t in enumerate(ids) if i % 7] and plan.skipped == 36
    assert len(plan_prelabel(api, pid, "v1", redo=True).tasks) == 250


def test_credentials_legacy_token_and_personal_access_token(ls, label_studio, label_studio_pat, caplog):
    pid = ls.create_project("prelabel auth", CONFIG)
    pat = label_studio_pat  # a JWT refresh token: the SDK exchanges it for a Bearer access token
    with LabelStudioApi(label_studio.url, pat) as with_pat:
        assert with_pat.label_config(pid) == CONFIG
        assert list(with_pat.iter_tasks(pid)) == []
    with LabelStudioApi(label_studio.url, label_studio.legacy_token) as legacy:
        assert legacy.label_config(pid) == CONFIG
    wrong = "0" * 40
    with LabelStudioApi(label_studio.url, wrong) as refused:
        with pytest.raises(LabelStudioApiError) as info:
            refused.label_config(pid)
    assert info.value.status == 401 and "LABEL_STUDIO_API_KEY" in str(info.value)
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(b'{"token_type":"refresh","exp":1000}').rstrip(b"=").decode()
    expired = f"{header}.{payload}.c2lnbmF0dXJl"
    with pytest.raises(LabelStudioApiError, match="personal access token"):
        LabelStudioApi(label_studio.url, expired)
    with pytest.raises(LabelStudioApiError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioApi(label_studio.url, None)
    assert pat not in caplog.text and wrong not in caplog.text and label_studio.legacy_token not in caplog.text
    assert pat not in repr(LabelStudioApi(label_studio.url, pat))


def test_embedded_runs_import_neither_redis_nor_rq_nor_torch():
    """Embedded mode works on installs without redis-py/RQ, and no bulk module loads the models."""
    probe = ("import sys, backend.bulk.runs, backend.bulk.adopt; "
             "print(sorted(m for m in ('redis', 'rq', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert out.strip() == "[]"


def test_run_state_values_are_the_wire_strings():
    """JSON bodies and the Redis hash hold the same strings as before the enum."""
    assert [s.value for s in RunState] == ["planning", "running", "done", "cancelled", "failed"]
    assert json.dumps({"status": RunState.DONE}) == '{"status": "done"}' and f"{RunState.DONE}" == "done"


def test_parse_model_versions():
    assert parse_model_versions("") == (frozenset(), False)
    assert parse_model_versions(None) == (frozenset(), False)
    assert parse_model_versions("b,a, c") == (frozenset({"a", "b", "c"}), False)
    assert parse_model_versions(["x", None, "y"]) == (frozenset({"x", "y"}), False)
    assert parse_model_versions("v" * 500)[1] is True  # capped by LS: read exactly


# ---------------------------------------------------------------------------------------- queue mode
class FakeQueue:
    """A ``ChunkQueue`` standing in for the RQ ``prelabel`` queue and one worker (a thread calling
    process_chunk), so the supervisor's logic runs against a real Redis and LS without RQ. ``lose``
    jobs vanish; ``ctrl_c`` makes the next look at the workers raise KeyboardInterrupt (what Ctrl-C
    does to the CLI while it follows the run)."""

    def __init__(self, redis_url: str, pipeline, api, lose: int = 0):
        self.items: queue.Queue = queue.Queue()
        self.busy: list[list[int]] = []
        self.lose = lose
        self.enqueued = 0
        self.cancelled = 0
        self.ctrl_c = False
        self.stop = threading.Event()
        self.store = RedisRunStore(redis.Redis.from_url(redis_url, socket_timeout=5))
        self.pipeline, self.api = pipeline, api
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def enqueue(self, run_id, spec, tasks):
        self.enqueued += 1
        if self.lose > 0:
            self.lose -= 1
            return "lost"
        self.items.put((run_id, spec.to_dict(), [t.to_json() for t in tasks]))  # JSON, as RQ carries it
        return f"job-{self.enqueued}"

    def in_flight(self, run_id):
        return self.items.qsize() + len(self.busy)

    def tasks_in_flight(self, run_id):
        queued = [tasks for _, _, tasks in list(self.items.queue)]
        return {t["id"] for tasks in queued for t in tasks} | {t for ids in self.busy for t in ids}

    def cancel(self, run_id):
        while not self.items.empty():
            self.items.get_nowait()
            self.cancelled += 1
        return self.cancelled

    def live_workers(self):
        if self.ctrl_c:
            raise KeyboardInterrupt
        return 1

    def live_model_versions(self, engine=None):
        return {} if self.stop.is_set() or engine not in (None, "grounded-sam") \
            else {self.pipeline.model_version: ["fake-worker"]}

    def live_engines(self):
        return {} if self.stop.is_set() else {"grounded-sam": self.live_model_versions()}

    def _work(self):
        while not self.stop.is_set():
            try:
                run_id, spec, tasks = self.items.get(timeout=0.1)
            except queue.Empty:
                continue
            ids = [t["id"] for t in tasks]
            self.busy.append(ids)
            try:
                process_chunk(self.pipeline, self.api, self.store, run_id, PrelabelSpec.from_dict(spec),
                              [BulkTask.from_json(t) for t in tasks])
            finally:
                self.busy.remove(ids)


def test_supervisor_requeues_lost_work_and_rides_out_a_redis_restart(ls, api, settings, pipeline, redis_server):
    pid, good, poison = make_project(ls, "prelabel supervisor", n_good=12, n_poison=1)
    fake = FakeQueue(redis_server.url, pipeline, api, lose=2)
    queue_settings = dataclasses.replace(settings, redis_url=redis_server.url)
    restarted = threading.Event()

    def restart_redis_when_started():
        deadline = time.monotonic() + 30
        while fake.enqueued == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        redis_server.restart(down_s=1.5)  # AOF on: the run survives; clients reconnect
        restarted.set()

    threading.Thread(target=restart_redis_when_started, daemon=True).start()
    try:
        runs = QueueRuns(queue_settings, connect(redis_server.url), chunks=fake, poll_s=0.1, stall_s=1.0)
        status = runs.run(RunRequest(project=pid, chunk=4, model_version=pipeline.model_version), progress=False)
    finally:
        fake.stop.set()
    assert restarted.is_set()
    assert (status.status, status.total, status.done, status.failed) == (DONE, 13, 12, 1), status
    assert fake.enqueued > 4  # the 2 lost chunks were re-enqueued after the stall
    assert_one_each(ls, good, poison, pipeline.model_version)


def test_ctrl_c_cancels_the_run_and_its_queued_jobs(ls, api, settings, pipeline, redis_server):
    pid, good, _ = make_project(ls, "prelabel cancel", n_good=6)
    fake = FakeQueue(redis_server.url, pipeline, api)
    fake.stop.set()  # no worker: the jobs stay queued
    fake.ctrl_c = True  # after the first supervision round (which enqueues the chunks)
    queue_settings = dataclasses.replace(settings, redis_url=redis_server.url)
    runs = QueueRuns(queue_settings, connect(redis_server.url), chunks=fake)
    status = runs.run(RunRequest(project=pid, chunk=2, model_version=pipeline.model_version), progress=False)
    assert status.status == CANCELLED and status.remaining == 6
    assert fake.cancelled == 3
    store = RedisRunStore(redis.Redis.from_url(redis_server.url))
    spec = store.spec(status.id)
    process_chunk(pipeline, api, store, status.id, spec, [BulkTask(id=t, data={}) for t in good])  # a late job
    assert store.status(status.id).done == 0 and versions_by_task(ls, good) == {t: Counter() for t in good}


def test_background_runs_for_post_prelabel(ls, api, settings, pipeline, redis_server):
    pid, good, _ = make_project(ls, "prelabel background", n_good=3)
    # embedded web process: processed in a thread on the app's pipeline, status in the app's memory store
    store = MemoryRunStore()
    run_id = EmbeddedRuns(settings, pipeline, store).start(RunRequest(project=pid, chunk=2)).id
    assert store.status(run_id) is not None
    status = wait_final(store, run_id)
    assert (status.status, status.done, status.total) == (DONE, 3, 3)

    # queue mode: the supervisor thread enqueues and follows; DELETE /jobs/<id> cancels
    fake = FakeQueue(redis_server.url, pipeline, api)
    queue_settings = dataclasses.replace(settings, redis_url=redis_server.url)
    connection = redis.Redis.from_url(redis_server.url)
    runs = QueueRuns(queue_settings, connection, RedisRunStore(connection), chunks=fake, poll_s=0.1)
    run_id = runs.start(RunRequest(project=pid, chunk=2, redo=True, model_version=pipeline.model_version)).id
    status = wait_final(RedisRunStore(connection), run_id)
    fake.stop.set()
    assert (status.status, status.done, status.total) == (DONE, 3, 3)
    assert_one_each(ls, good, [], pipeline.model_version)

    run_id = runs.start(RunRequest(project=pid, redo=True, model_version=pipeline.model_version)).id
    assert runs.cancel(run_id).status == CANCELLED  # it was planning or running
    assert wait_final(RedisRunStore(connection), run_id).status == CANCELLED


def test_a_run_whose_supervisor_died_while_planning_is_adopted_and_planned_again(ls, api, settings, pipeline,
                                                                                redis_server):
    pid, good, poison = make_project(ls, "prelabel adopted", n_good=5, n_poison=1)
    fake = FakeQueue(redis_server.url, pipeline, api)
    queue_settings = dataclasses.replace(settings, redis_url=redis_server.url)
    connection = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    store = RedisRunStore(connection)
    spec = PrelabelSpec(project=pid, label_config=CONFIG, prompt=None, model_version=pipeline.model_version)
    run_id = store.create(spec, None, chunk=2)  # POST /prelabel answered, then its web process died
    assert store.take_lease(run_id, "the-dead-web-process", ttl=1.0)
    assert run_id not in adopt_orphaned_runs(queue_settings, connection, chunks=fake)  # its lease is still live
    deadline = time.monotonic() + 10
    while store.lease_holder(run_id) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_id in adopt_orphaned_runs(queue_settings, connection, chunks=fake)
    assert run_id not in adopt_orphaned_runs(queue_settings, connection, chunks=fake)  # one supervisor per run
    status = wait_final(store, run_id)
    fake.stop.set()
    assert (status.status, status.total, status.done, status.failed) == (DONE, 6, 5, 1), status
    assert_one_each(ls, good, poison, pipeline.model_version)
    assert store.lease_holder(run_id) is None and connection.ttl(f"gsam:run:{run_id}") > 0


def wait_final(store, run_id, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.status(run_id)
        if status is not None and status.status in (DONE, CANCELLED, "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not end: {store.status(run_id)}")


@pytest.mark.timeout(120)
def test_queue_mode_with_a_real_worker_survives_a_redis_restart(ls, settings, redis_server, start_worker):
    pid, good, poison = make_project(ls, "prelabel real worker", n_good=16, n_poison=1)
    start_worker(redis_server.url, "--queues", "prelabel", LABEL_STUDIO_URL=settings.label_studio_url,
                 LABEL_STUDIO_API_KEY=settings.label_studio_api_key)
    queue_settings = dataclasses.replace(settings, redis_url=redis_server.url)
    connection = redis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    store = RedisRunStore(connection)

    def restart_redis_mid_run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                runs = [store.status(r) for r in store.run_ids()]
                if any(s and s.project == pid and s.done >= 2 for s in runs):
                    break
            except redis.RedisError:
                pass
            time.sleep(0.05)
        redis_server.restart(down_s=1.0)

    threading.Thread(target=restart_redis_mid_run, daemon=True).start()
    runs = QueueRuns(queue_settings, connection, poll_s=0.2, stall_s=3.0)
    status = runs.run(RunRequest(project=pid, chunk=4), progress=False)
    assert (status.status, status.total, status.done, status.failed) == (DONE, 17, 16, 1), status
    assert list(status.failures) == poison
    assert_one_each(ls, good, poison, Pipeline(settings).model_version)
