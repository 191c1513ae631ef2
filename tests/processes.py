"""Starting the backend's processes for tests and benches: one ``free_port`` and one worker launcher.

Used by the fixtures (tests/conftest.py), the Label Studio harness (tests/lsharness.py) and the
benches (bench/queue_bench.py, bench/soak.py). It lives under tests/ because the tests are its main
users and the benches already import their servers (RedisServer, LabelStudioServer) from there;
it imports no pytest, so a bench that needs only these two pays for nothing else.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; another process may take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_worker_process(env: dict[str, str], log_path: Path, *args: str, ready_s: float = 60.0) -> subprocess.Popen:
    """``python -m backend worker ARGS`` with exactly ``env``, its output in ``log_path``.

    The worker gets its own session (process group), so ``os.killpg(process.pid, ...)`` stops it and
    anything it started. Returns once the worker logs ``serving`` (models loaded, queues served);
    RuntimeError with the log's tail if it exits first or takes longer than ``ready_s``.
    """
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "backend", "worker", *args], cwd=REPO, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + ready_s
    while "serving" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return process
