"""Shared fixtures: tiny models built once per session, and real backend servers as subprocesses."""

from __future__ import annotations

import json
import os

# Custom Triton kernels run in Triton's CPU interpreter in tests (tests/test_kernels.py): the flag is
# read once, when triton is first imported, which torch may do while another module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from backend.settings import Settings
from tests.processes import free_port, start_worker_process

REPO = Path(__file__).resolve().parent.parent
# Request bodies recorded from a real LS 1.23.2 server (copied from the team's shared/ls-protocol,
# so a clone runs its tests without it).
PROTOCOL = REPO / "tests" / "fixtures" / "ls-protocol"


def recorded(name: str) -> dict:
    """One recorded exchange, e.g. ``recorded("predict_batch_request.json")["body"]``."""
    return json.loads((PROTOCOL / name).read_text())


def wait_until_up(url: str, process: subprocess.Popen, log_path: Path, deadline_s: float = 60.0,
                  statuses: tuple[int, ...] = (200,)) -> None:
    """Wait until ``/health`` answers one of ``statuses`` (503 too for a backend expected DOWN)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code in statuses:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not answer /health within {deadline_s} s:\n"
                       f"{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """``DIR`` with ``grounding-dino`` and ``sam`` built by the real make-tiny-models command."""
    root = tmp_path_factory.mktemp("tiny-models")
    subprocess.run([sys.executable, "-m", "backend", "make-tiny-models", str(root)], cwd=REPO, check=True,
                   capture_output=True)
    return root


@pytest.fixture(scope="session")
def tiny_family(tiny_models):
    """``tiny_family("sam2")`` → ``DIR/sam2``, built once per session by the real
    ``make-tiny-models --family`` command (families: sam-hq, sam2, sam3, sam3-video, mm-grounding-dino, sam2-video)."""
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            subprocess.run([sys.executable, "-m", "backend", "make-tiny-models", str(tiny_models), "--family", family],
                           cwd=REPO, check=True, capture_output=True)
            built[family] = tiny_models / family
        return built[family]

    return build


@pytest.fixture(scope="session")
def tiny_env(tiny_models) -> dict[str, str]:
    """Env for a backend on the tiny models that always detects something (thresholds 0)."""
    return {"GROUNDING_DINO_MODEL": str(tiny_models / "grounding-dino"), "SAM_MODEL": str(tiny_models / "sam"),
            "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5", "BATCH_SIZE": "4"}


@pytest.fixture(scope="session")
def tiny_settings(tiny_env) -> Settings:
    return Settings.from_env(tiny_env)


@pytest.fixture(scope="module")
def engine(tiny_settings):
    """The real engine on the tiny models, one per test module."""
    from backend.engine.engine import Engine  # torch: only for the modules that use it

    return Engine.from_settings(tiny_settings)


@dataclass
class BackendProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def start_backend(tiny_env, tmp_path_factory):
    """Factory: ``start_backend(**env) -> BackendProcess`` running ``python _wsgi.py`` on the tiny models.

    With ``server="gunicorn"`` it runs ``gunicorn _wsgi:app`` instead. Stopped at module teardown.
    """
    started: list[BackendProcess] = []

    def start(server: str = "wsgi", statuses: tuple[int, ...] = (200,), **env: str) -> BackendProcess:
        port = free_port()
        log_path = tmp_path_factory.mktemp("backend") / "backend.log"
        full_env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "LABEL_STUDIO_URL",
                                                                      "LABEL_STUDIO_API_KEY"}}
        full_env.update(tiny_env, LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        full_env.update({k: str(v) for k, v in env.items()})
        if server == "gunicorn":
            command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--threads", "4",
                       "--timeout", "120", "_wsgi:app"]
        else:
            command = [sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(port)]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        backend = BackendProcess(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        started.append(backend)
        wait_until_up(backend.url, process, log_path, statuses=statuses)
        return backend

    yield start
    for backend in started:
        backend.stop()


@dataclass
class RedisServer:
    """A redis-server of the test's own (free port, own data dir, AOF on so a restart keeps data)."""

    port: int
    data_dir: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: .ci/run installs it (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def start_worker(tiny_env, tmp_path_factory):
    """Factory: ``start_worker(redis_url, **env) -> BackendProcess`` running ``python -m backend worker``."""
    started: list[BackendProcess] = []

    def start(redis_url: str, *args: str, **env: str) -> BackendProcess:
        log_path = tmp_path_factory.mktemp("worker") / "worker.log"
        full_env = {k: v for k, v in os.environ.items() if k not in {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"}}
        full_env.update(tiny_env, LOG_LEVEL="INFO", PYTHONUNBUFFERED="1", REDIS_URL=redis_url)
        full_env.update({k: str(v) for k, v in env.items()})
        worker = BackendProcess(url="", process=start_worker_process(full_env, log_path, *args), log_path=log_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def label_studio(request):
    """One real Label Studio 1.23 server for the whole session (its first start migrates a fresh
    sqlite database: ~30 s on 2 cores). Skipped when LS is not installed, except with CI=true."""
    from tests.lsharness import LabelStudioServer, label_studio_bin_or_skip

    binary = label_studio_bin_or_skip()
    failed_before = request.session.testsfailed
    with LabelStudioServer(binary) as server:
        yield server
        if request.session.testsfailed > failed_before:
            print(f"\n[label studio] log tail ({server.log_path}):\n{server.log_tail(8000)}")


#: Debian's Chromium, which the browser tests drive with Playwright (never ``playwright install``).
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium (Debian's) under Playwright for every browser test module; skipped
    locally when either is missing, failed with CI=true (CI installs both: scripts/bootstrap.sh).
    Each test opens its own context (cookies, local storage) on it."""
    from tests.lsharness import is_ci

    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install -r requirements-test.txt)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if is_ci():
            pytest.fail("CI=true and " + reason, pytrace=False)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def ls(label_studio):
    """An API client of the session's Label Studio, logged in as its admin."""
    return label_studio.client()


@pytest.fixture(scope="session")
def label_studio_pat(label_studio) -> str:
    """The LS admin's personal access token (a JWT refresh token). LS 1.23 allows one live PAT per
    user (a second ``POST /api/token/`` answers 409), so the session creates it once for all modules."""
    return label_studio.client().create_pat()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def queue_stack(redis_server, start_worker, start_backend, metrics_port):
    """A queue-mode web process and one worker (serving its metrics on ``metrics_port``) on one Redis."""
    worker = start_worker(redis_server.url, "--metrics-port", str(metrics_port))
    web = start_backend(REDIS_URL=redis_server.url, PREDICT_TIMEOUT="60")
    return web, worker
