"""Soak: N concurrent annotators for S seconds, text prompts mixed with smart-tool clicks, in
embedded mode and in queue mode (Redis + W workers), in one invocation.

Each annotator loops: a text-prompt /predict on an image, then a click on the same image (the
second request of the pair is an embedding-cache hit where SAM lives), on a pool of images. Bodies
have the shape LS 1.23 sends (tests/fixtures/ls-protocol/predict_interactive_request.json: the task
with LS's own fields, ``params.context``), with data-URI images, so nothing leaves the machine.
Servers are tiny random-weight models behind gunicorn (1 process x 8 threads, the Docker default)
on 127.0.0.1; queue mode adds its own redis-server and ``python -m backend worker`` processes
(``WORKER_THREADS`` each). Every run stops by itself after S seconds (plus the requests in flight).

    python bench/soak.py [--clients 4,20] [--seconds 20] [--modes embedded,queue] [--workers 2]
                         [--worker-threads 1] [--json OUT]

Prints and writes, per mode and client count: requests, errors (must be 0), throughput, p50/p99.
Ratios between modes matter on a shared CPU host, not absolute figures.

Click affinity (``--modes affinity``, e.g. ``--modes affinity --workers 4 --clients 4``): queue mode
twice in one invocation, today's routing (``CLICK_AFFINITY=false``: any worker takes any job) and
click affinity (the default), with every text → click pair on a task of its own (its own id and
image, so no cache is warm by accident). From each worker's ``--metrics-port`` it reads the
embedding-cache hits and misses: the second-click hit rate (hits / clicks) and the encoder calls
per task (misses / tasks), beside p50/p99 of the same run.
"""

from __future__ import annotations

import argparse
import base64
import copy
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import RedisServer, recorded, wait_until_up  # noqa: E402
from tests.processes import free_port, start_worker_process  # noqa: E402
from tests.test_protocol import png  # noqa: E402

MAX_CLIENTS, MAX_SECONDS = 64, 300  # bounds: this is a bench on a shared machine, not a load generator
REQUEST_TIMEOUT_S = 60
CLICK_TOOL = '<KeyPointLabels name="click" toName="image" smart="true"><Label value="circle"/></KeyPointLabels>'


def request_bodies(images: int) -> list[tuple[dict, dict]]:
    """``(text prompt body, click body)`` per image, both in LS's recorded /predict shape."""
    template = recorded("predict_interactive_request.json")["body"]
    pairs = []
    for i in range(images):
        uri = "data:image/png;base64," + base64.b64encode(png(160 + 8 * i, 120 + 4 * i)).decode()
        text = copy.deepcopy(template)
        text["tasks"][0]["data"]["image"] = uri
        click = copy.deepcopy(text)
        config = text["label_config"].rstrip()
        click["label_config"] = config[: -len("</View>")] + CLICK_TOOL + "</View>"  # the outer </View>
        click["params"]["context"] = {"result": [{
            "id": f"click{i}", "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "origin": "manual", "is_positive": True, "original_width": 160 + 8 * i, "original_height": 120 + 4 * i,
            "value": {"x": 40.0 + i, "y": 50.0, "width": 0.5, "keypointlabels": ["circle"]}}]}
        pairs.append((text, click))
    return pairs


def fresh_pair(template: tuple[dict, dict], task: int) -> tuple[dict, dict]:
    """``template``'s text → click pair on task ``task`` with an image of its own (another size per
    task: other bytes, another embedding)."""
    width, height = 160 + task % 101, 120 + task // 101 % 997
    uri = "data:image/png;base64," + base64.b64encode(png(width, height)).decode()
    pair = copy.deepcopy(template)
    for payload in pair:
        payload["tasks"][0].update(id=task, data={**payload["tasks"][0]["data"], "image": uri})
        for region in (payload["params"]["context"] or {}).get("result", []):
            region.update(original_width=width, original_height=height)
    return pair


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else 0.0


#: Task ids of fresh pairs: never repeated within one invocation (caches of an earlier run stay cold).
FRESH_TASKS = itertools.count(10_000)


def soak(url: str, clients: int, seconds: float, pairs: list[tuple[dict, dict]], fresh: bool = False) -> dict:
    """``clients`` threads, each looping text → click on its next image until ``seconds`` pass
    (``fresh``: each pair on a new task, :func:`fresh_pair`)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    tasks = FRESH_TASKS  # fresh task ids across runs too (next() under the lock)

    def annotator(index: int) -> None:
        session = requests.Session()
        turn = index
        while time.monotonic() < deadline:
            if fresh:
                with lock:
                    task = next(tasks)
                pair = fresh_pair(pairs[0], task)
            else:
                pair = pairs[turn % len(pairs)]
            for payload in pair:
                started = time.perf_counter()
                try:
                    response = session.post(f"{url}/predict", json=payload, timeout=REQUEST_TIMEOUT_S)
                    problem = None if response.status_code == 200 and response.json()["results"][0]["result"] \
                        else f"{response.status_code}: {response.text[:200]}"
                except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)
            turn += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=annotator, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 2 * REQUEST_TIMEOUT_S + 10)
    wall = time.perf_counter() - started
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies), "pairs": len(latencies) // 2,
            "errors": len(errors),
            "first_errors": errors[:3], "throughput_rps": round(len(latencies) / wall, 2),
            "p50_s": round(percentile(latencies, 50), 3), "p99_s": round(percentile(latencies, 99), 3)}


def start_process(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """``command`` in its own session, output in ``log_path``; the caller waits for it to be up."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cache_counts(ports: list[int]) -> tuple[float, float]:
    """(hits, misses) of the embedding caches of the workers serving metrics on ``ports``."""
    hits = misses = 0.0
    for port in ports:
        for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
            if line.startswith("gsam_embedding_cache_hits_total "):
                hits += float(line.split()[-1])
            elif line.startswith("gsam_embedding_cache_misses_total "):
                misses += float(line.split()[-1])
    return hits, misses


#: What each mode runs: (queue mode?, CLICK_AFFINITY, fresh tasks per pair)
MODES = {"embedded": (False, None, False), "queue": (True, None, False),
         "queue-no-affinity": (True, "false", True), "queue-affinity": (True, "true", True)}


def run_mode(mode: str, args, env: dict, tmp: Path, pairs) -> list[dict]:
    processes: list[subprocess.Popen] = []
    redis_server = None
    queued, affinity, fresh = MODES[mode]
    ports = [free_port() for _ in range(args.workers)] if queued else []
    try:
        web_env = dict(env)
        if affinity is not None:
            web_env["CLICK_AFFINITY"] = affinity
        if queued:
            (tmp / mode).mkdir(exist_ok=True)
            redis_server = RedisServer(port=free_port(), data_dir=tmp / mode).start()
            web_env["REDIS_URL"] = redis_server.url
            for i, port in enumerate(ports):
                processes.append(start_worker_process({**web_env, "WORKER_THREADS": str(args.worker_threads)},
                                                      tmp / f"worker{i}-{mode}.log", "--metrics-port", str(port),
                                                      ready_s=120))
        port = free_port()
        web = start_process([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                             "--threads", "8", "--timeout", "120", "_wsgi:app"], web_env, tmp / f"web-{mode}.log")
        processes.append(web)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, web, tmp / f"web-{mode}.log", deadline_s=120)
        for payload in pairs[0]:  # warm-up, so no timed request pays for loading or first-call allocations
            requests.post(f"{url}/predict", json=payload, timeout=REQUEST_TIMEOUT_S).raise_for_status()
        results = []
        for clients in args.clients:
            before = cache_counts(ports) if fresh else (0.0, 0.0)
            figures = {"mode": mode, **soak(url, clients, args.seconds, pairs, fresh=fresh)}
            if fresh:  # every pair is a new task: its text encodes once, its click should hit
                hits, misses = (after - earlier for after, earlier in zip(cache_counts(ports), before))
                figures.update(second_click_hit_rate=round(hits / max(figures["pairs"], 1), 3),
                               encoder_calls_per_task=round(misses / max(figures["pairs"], 1), 3))
            print(json.dumps(figures), flush=True)
            results.append(figures)
        return results
    finally:
        stop(processes)
        if redis_server:
            redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,20", help="comma-separated concurrent annotator counts")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--modes", default="embedded,queue",
                        help=f"of {', '.join(MODES)}; 'affinity' = queue-no-affinity,queue-affinity")
    parser.add_argument("--workers", type=int, default=2, help="queue mode: worker processes")
    parser.add_argument("--worker-threads", type=int, default=1, help="queue mode: WORKER_THREADS per worker")
    parser.add_argument("--images", type=int, default=8, help="distinct images the annotators cycle through")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    aliases = {"affinity": ["queue-no-affinity", "queue-affinity"]}
    modes = [mode for m in args.modes.split(",") if m.strip() for mode in aliases.get(m.strip(), [m.strip()])]
    if not args.clients or any(not 1 <= c <= MAX_CLIENTS for c in args.clients):
        parser.error(f"--clients: each between 1 and {MAX_CLIENTS}")
    if not 1 <= args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds: between 1 and {MAX_SECONDS}")
    if not set(modes) <= set(MODES) or not modes:
        parser.error(f"--modes: of {', '.join(MODES)}, or affinity")

    pairs = request_bodies(args.images)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        subprocess.run([sys.executable, "-m", "backend", "make-tiny-models", str(tmp_path / "models")], cwd=REPO,
                       check=True, capture_output=True)
        env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"}}
        env.update(GROUNDING_DINO_MODEL=str(tmp_path / "models/grounding-dino"), SAM_MODEL=str(tmp_path / "models/sam"),
                   BOX_THRESHOLD="0", TEXT_THRESHOLD="0", MAX_DETECTIONS="5", LOG_LEVEL="INFO",
                   PREDICT_TIMEOUT="55", PYTHONUNBUFFERED="1")
        for mode in modes:
            results.extend(run_mode(mode, args, env, tmp_path, pairs))
    summary = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
               "seconds_per_run": args.seconds, "workers": args.workers, "worker_threads": args.worker_threads,
               "web": "gunicorn 1 process x 8 threads", "runs": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if any(run["errors"] for run in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
