"""Bulk pre-labeling throughput: 1 worker vs 2 workers on the same run, in one invocation.

Starts its own redis-server and Label Studio (tests/lsharness.py), builds tiny random-weight models,
creates two identical projects of N image tasks, and times `python -m backend prelabel` end to end
(listing, queueing, inference, write-back to LS) with 1 and then 2 worker processes.

    python bench/queue_bench.py [--tasks 120] [--chunk 8] [--threads-per-worker 1] [--json OUT]

Ratios only on a CPU machine (absolute times depend on the host); run on a GPU host with real models
(GROUNDING_DINO_MODEL / SAM_MODEL) for absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import RedisServer  # noqa: E402
from tests.processes import free_port, start_worker_process  # noqa: E402
from tests.lsharness import LabelStudioServer, find_label_studio_bin  # noqa: E402
from tests.test_bulk import image_uri  # noqa: E402
from tests.test_http import CONFIG  # noqa: E402


def timed_run(project: int, workers: int, env: dict, logs: Path, chunk: int) -> float:
    procs = [start_worker_process(env, logs / f"worker{i}-{time.time_ns()}.log", ready_s=120) for i in range(workers)]
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project), "--chunk",
                        str(chunk)], cwd=REPO, env=env, check=True, capture_output=True)
        return time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=120)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="torch/OMP threads per worker (1 = one core each, so 2 workers can use 2 cores)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        subprocess.run([sys.executable, "-m", "backend", "make-tiny-models", str(tmp_path / "models")], cwd=REPO,
                       check=True, capture_output=True)
        redis = RedisServer(port=free_port(), data_dir=tmp_path).start()
        try:
            with LabelStudioServer(find_label_studio_bin()) as ls_server:
                ls = ls_server.client()
                projects = []
                for name in ("one worker", "two workers"):
                    project = ls.create_project(f"bench {name}", CONFIG)
                    ls.import_tasks(project, [{"image": image_uri(i)} for i in range(args.tasks)])
                    projects.append(project)
                threads = str(args.threads_per_worker)
                env = {**os.environ, "REDIS_URL": redis.url, "LABEL_STUDIO_URL": ls_server.url,
                       "LABEL_STUDIO_API_KEY": ls_server.legacy_token, "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0",
                       "MAX_DETECTIONS": "5", "GROUNDING_DINO_MODEL": str(tmp_path / "models/grounding-dino"),
                       "SAM_MODEL": str(tmp_path / "models/sam"), "OMP_NUM_THREADS": threads,
                       "MKL_NUM_THREADS": threads, "LOG_LEVEL": "INFO"}
                one = timed_run(projects[0], 1, env, tmp_path, args.chunk)
                two = timed_run(projects[1], 2, env, tmp_path, args.chunk)
        finally:
            redis.stop()
    figures = {
        "tasks": args.tasks, "chunk": args.chunk, "threads_per_worker": args.threads_per_worker,
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "one_worker_s": round(one, 2), "two_workers_s": round(two, 2),
        "one_worker_tasks_per_s": round(args.tasks / one, 2), "two_workers_tasks_per_s": round(args.tasks / two, 2),
        "ratio_two_vs_one": round(one / two, 2),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
