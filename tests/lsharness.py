"""Harness that runs a real Label Studio (1.23.x) server for end-to-end tests.

``LabelStudioServer`` starts ``label-studio start`` as a subprocess on 127.0.0.1 and a free port, on
sqlite in a throw-away data directory, with a pre-created admin user whose legacy API token is
known; ``LabelStudioClient`` is a small ``requests`` client for the REST endpoints the e2e tests use.

Where the LS executable comes from (first hit wins):

1. ``$LABEL_STUDIO_BIN``;
2. ``<repo>/.venv-ls/bin/label-studio`` (where CI installs LS, in its own venv);
3. ``label-studio`` on ``PATH``.

If none exists, :func:`label_studio_bin_or_skip` skips the test locally but fails it when ``CI`` is
true, so that CI can never pass by silently skipping the e2e tests.

Knobs (env): ``LS_START_TIMEOUT`` (seconds, default 240), ``LS_HARNESS_KEEP=1`` (keep the temp dir
with LS's log and sqlite file), ``LS_HARNESS_CACHE_DIR=<dir>`` (keep a migrated database there and
reuse it: LS then starts in ~3 s instead of ~30 s; keyed by the LS install).

Things LS 1.23.2 does that the harness/tests depend on (read from its source, see the e2e report):

* ``label-studio start`` runs the migrations (about 30 s on a 2-core machine with a fresh sqlite
  file), creates the user (``--username/--password/--user-token``), then serves with Django's
  threaded ``runserver``. If the port is taken it silently moves to the next one, so the harness
  reads the real port from the log.
* The organization is created with legacy tokens enabled only with ``--enable-legacy-api-token``
  (or ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN``); a stock 1.23 org has them disabled and only
  personal access tokens (JWT refresh tokens, ``POST /api/token/``) work.
* On ``POST /api/ml`` LS validates the backend (``GET /health`` with a 1 s timeout, ``POST /setup``
  with 3 s), then saves it and calls health+setup again; ``GET /api/ml/<id>`` and every "Retrieve
  predictions" call health+setup first too. ``/predict`` has a 100 s timeout
  (``ML_TIMEOUT_PREDICT``); a backend error is only logged, the action still answers 200.
* LS reads settings from ``LABEL_STUDIO_<X>``, ``HEARTEX_<X>`` and plain ``<X>`` env vars, so
  ``HOST``, ``PORT``, ``USERNAME``, ... leaking from the caller's environment change its behaviour;
  the harness scrubs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

import requests

from tests.processes import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

ADMIN_EMAIL = "admin@example.com"
DEFAULT_START_TIMEOUT = 240.0  # first start runs ~all migrations: ~30 s on 2 cores, slower CI runners exist
DEFAULT_STOP_TIMEOUT = 20.0
# What LS needs for a given call to the ML backend, plus slack: /predict may take up to
# ML_TIMEOUT_PREDICT (100 s) per request on LS's side.
ML_CALL_TIMEOUT = 300.0

# Settings LS picks up from plain env names (besides LABEL_STUDIO_*/HEARTEX_*), which must not leak
# from the environment the tests run in.
_SCRUBBED_PLAIN_ENV = (
    "HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME", "DJANGO_DB", "DEBUG",
    "DJANGO_SETTINGS_MODULE", "LOG_LEVEL", "JSON_LOG", "SECRET_KEY", "BASE_DATA_DIR", "MEDIA_ROOT",
    "LOCAL_FILES_SERVING_ENABLED", "LOCAL_FILES_DOCUMENT_ROOT", "ENABLE_LEGACY_API_TOKEN",
    "SSRF_PROTECTION_ENABLED", "ML_BLOCK_LOCAL_IP", "COLLECT_ANALYTICS", "LATEST_VERSION_CHECK",
    "SENTRY_DSN", "FRONTEND_SENTRY_DSN", "FEATURE_FLAGS_OFFLINE", "FEATURE_FLAGS_FROM_FILE",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
)
_SCRUBBED_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "ML_TIMEOUT_", "POSTGRE_", "MYSQL_", "REDIS_")


_NO_PROXY = requests.Session()
_NO_PROXY.trust_env = False  # HTTP(S)_PROXY from the environment must not apply to 127.0.0.1


def is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def find_label_studio_bin() -> Optional[str]:
    """Path of the ``label-studio`` executable, or None (see module docstring for the order)."""
    env_bin = os.environ.get("LABEL_STUDIO_BIN")
    if env_bin:
        p = Path(env_bin).expanduser()
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
        found = shutil.which(env_bin)
        return found  # explicitly configured but missing -> None (reported by the caller)
    for candidate in (REPO_ROOT / ".venv-ls" / "bin" / "label-studio",
                      REPO_ROOT / ".venv-ls" / "Scripts" / "label-studio.exe"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("label-studio")


def label_studio_bin_or_skip() -> str:
    """The LS executable; otherwise skip the test (locally) or fail it (``CI=true``)."""
    import pytest

    found = find_label_studio_bin()
    if found:
        return found
    reason = (
        "Label Studio executable not found: set LABEL_STUDIO_BIN, or install label-studio==1.23.* "
        f"into {REPO_ROOT / '.venv-ls'} (python -m venv .venv-ls && .venv-ls/bin/pip install "
        "'label-studio==1.23.*'), or put label-studio on PATH"
    )
    if os.environ.get("LABEL_STUDIO_BIN"):
        reason = f"LABEL_STUDIO_BIN={os.environ['LABEL_STUDIO_BIN']!r} is not an executable. " + reason
    if is_ci():
        pytest.fail("CI=true and the e2e tests cannot run: " + reason, pytrace=False)
    pytest.skip(reason)


def tail(path: Path, max_chars: int = 8000) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return data[-max_chars:].decode("utf-8", "replace")


class LabelStudioError(RuntimeError):
    pass


class LabelStudioServer:
    """A real Label Studio server in a subprocess (context manager).

    Attributes (valid after start): ``url`` (``http://127.0.0.1:PORT``), ``port``,
    ``legacy_token``, ``username``, ``password``, ``data_dir`` (LS_BASE_DATA_DIR), ``local_files_root``
    (LOCAL_FILES_DOCUMENT_ROOT; put files under ``<root>/<subdir>/`` and add a local-files storage
    for ``<root>/<subdir>``), ``log_path``, ``start_seconds``.
    """

    def __init__(self, label_studio_bin: Optional[str] = None, *, start_timeout: Optional[float] = None,
                 extra_env: Optional[dict] = None, workdir: Optional[str] = None,
                 keep_workdir: Optional[bool] = None, cache_dir: Optional[str] = None):
        self.label_studio_bin = label_studio_bin or find_label_studio_bin()
        if not self.label_studio_bin:
            raise LabelStudioError("label-studio executable not found (see tests/lsharness.py)")
        self.start_timeout = float(start_timeout or os.environ.get("LS_START_TIMEOUT") or DEFAULT_START_TIMEOUT)
        self.extra_env = dict(extra_env or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ls-e2e-"))
        if keep_workdir is None:
            keep_workdir = os.environ.get("LS_HARNESS_KEEP", "") not in ("", "0", "false")
        self.keep_workdir = keep_workdir
        self.data_dir = self.workdir / "data"
        self.local_files_root = self.workdir / "files"
        self.config_home = self.workdir / "home"
        self.log_path = self.workdir / "label-studio.log"
        self.username = ADMIN_EMAIL
        self.password = "pw-" + secrets.token_hex(8)
        self.legacy_token = "legacy" + secrets.token_hex(17)  # 40 chars like LS's own keys
        self.port: Optional[int] = None
        self.url: Optional[str] = None
        self.start_seconds: Optional[float] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None
        self._log_offset = 0
        self.cache_dir = cache_dir or os.environ.get("LS_HARNESS_CACHE_DIR") or None
        self.from_cache = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LabelStudioServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in _SCRUBBED_PLAIN_ENV and not k.startswith(_SCRUBBED_PREFIXES)}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "DJANGO_DB": "sqlite",
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "ML_BLOCK_LOCAL_IP": "false",  # our backend lives on 127.0.0.1
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.local_files_root),
            "COLLECT_ANALYTICS": "false",  # else it posts usage to tele.labelstud.io
            "LATEST_VERSION_CHECK": "false",  # else /version asks PyPI
            "FEATURE_FLAGS_OFFLINE": "true",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "SECRET_KEY": secrets.token_hex(32),
            "DEBUG": "false",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            # appdirs: LS writes ~/.config/label-studio/user_id etc.; keep it in the temp dir
            "XDG_CONFIG_HOME": str(self.config_home / "config"),
            "XDG_DATA_HOME": str(self.config_home / "data"),
            "XDG_CACHE_HOME": str(self.config_home / "cache"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        env.update({k: str(v) for k, v in self.extra_env.items()})
        return env

    def command(self, port: int) -> list:
        return [
            self.label_studio_bin, "start",
            "--no-browser",
            "--internal-host", "127.0.0.1",  # bind loopback only (default is 0.0.0.0)
            "--port", str(port),
            "--username", self.username,
            "--password", self.password,
            "--user-token", self.legacy_token,
            "--enable-legacy-api-token",
            "--log-level", "INFO",
        ]

    def start(self) -> "LabelStudioServer":
        """Start LS and wait until it serves. With a cache dir (``cache_dir=`` or
        ``$LS_HARNESS_CACHE_DIR``) the migrated database of a first start is kept there (per LS
        install) and copied in on later starts: ~3 s instead of ~30 s of migrations."""
        if self.proc is not None:
            raise LabelStudioError("already started")
        for d in (self.data_dir, self.local_files_root, self.config_home):
            d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        entry = self._cache_entry()
        if entry is not None and (entry / "credentials.json").is_file():
            creds = json.loads((entry / "credentials.json").read_text())
            self.username, self.password, self.legacy_token = (creds["username"], creds["password"],
                                                               creds["legacy_token"])
            shutil.copytree(entry / "data", self.data_dir, dirs_exist_ok=True)
            self.from_cache = True
            try:
                self._launch()
            except LabelStudioError as exc:  # stale/broken cache entry: start from scratch below
                print(f"[lsharness] cached LS database {entry} did not work, migrating afresh: {exc}"[:2000])
                shutil.rmtree(entry, ignore_errors=True)
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir.mkdir(parents=True)
                self.from_cache = False
                self.password = "pw-" + secrets.token_hex(8)
                self.legacy_token = "legacy" + secrets.token_hex(17)
        if not self.from_cache:
            self._launch()
            if entry is not None:
                # snapshot the freshly migrated DB (server stopped, so sqlite is consistent), restart
                self._terminate()
                self._save_cache(entry)
                self._launch()
        self.start_seconds = time.monotonic() - t0
        return self

    def _cache_entry(self) -> Optional[Path]:
        if not self.cache_dir:
            return None
        real = Path(os.path.realpath(self.label_studio_bin))
        st = real.stat()
        dists = sorted(p.name for p in real.parent.parent.glob("lib/python*/site-packages/label_studio-*.dist-info"))
        key = hashlib.sha1(f"{real}|{st.st_mtime_ns}|{st.st_size}|{dists}".encode()).hexdigest()[:16]
        return Path(self.cache_dir) / f"ls-db-{key}"

    def _save_cache(self, entry: Path) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            shutil.copytree(self.data_dir, tmp / "data")
            (tmp / "credentials.json").write_text(json.dumps(
                {"username": self.username, "password": self.password, "legacy_token": self.legacy_token}))
            os.rename(tmp, entry)  # atomic; fails if a concurrent run got there first, which is fine
        except OSError as exc:
            print(f"[lsharness] not caching the LS database in {entry}: {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _launch(self) -> None:
        port = free_port()
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_offset = self._log_file.tell()  # a reused workdir keeps older runs' logs
        t0 = time.monotonic()
        popen_kw = {}
        if os.name == "posix":
            popen_kw["start_new_session"] = True  # own process group: stop() kills runserver's children too
        self.proc = subprocess.Popen(
            self.command(port), cwd=str(self.workdir), env=self._env(), stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, **popen_kw,
        )
        try:
            self._wait_ready(port, t0)
        except BaseException:
            self._terminate()  # keeps the workdir: its log is what explains the failure
            raise

    def _wait_ready(self, requested_port: int, t0: float) -> None:
        deadline = t0 + self.start_timeout
        port_re = re.compile(rb"Starting development server at http://[^:/]+:(\d+)/")
        port = None
        while True:
            if self.proc.poll() is not None:
                raise LabelStudioError(
                    f"label-studio exited with code {self.proc.returncode} during start-up "
                    f"(after {time.monotonic() - t0:.1f}s); log {self.log_path}:\n{tail(self.log_path)}")
            if port is None:
                try:
                    m = port_re.search(self.log_path.read_bytes()[self._log_offset:])
                except OSError:
                    m = None
                if m:
                    port = int(m.group(1))
                    if port != requested_port:
                        # LS silently moves on when the port is taken (someone grabbed our free port)
                        print(f"[lsharness] label-studio moved from port {requested_port} to {port}")
            probe_port = port
            if probe_port is None and time.monotonic() - t0 > 60:
                probe_port = requested_port  # the log line's format may have changed
            if probe_port is not None:
                try:
                    r = _NO_PROXY.get(f"http://127.0.0.1:{probe_port}/health", timeout=5)
                    if r.status_code == 200:
                        break
                except requests.RequestException:
                    pass
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    f"label-studio not ready after {self.start_timeout:.0f}s "
                    f"(set LS_START_TIMEOUT to wait longer); log {self.log_path}:\n{tail(self.log_path)}")
            time.sleep(0.5)
        self.port = probe_port
        self.url = f"http://127.0.0.1:{probe_port}"
        # The user is created before the server starts serving; make sure the token really works.
        r = _NO_PROXY.get(f"{self.url}/api/current-user/whoami",
                         headers={"Authorization": f"Token {self.legacy_token}"}, timeout=30)
        if r.status_code != 200:
            raise LabelStudioError(f"legacy token rejected by LS: {r.status_code} {r.text[:500]}\n"
                                   f"{tail(self.log_path)}")

    def stop(self) -> None:
        proc = self._terminate()
        if self._own_workdir and not self.keep_workdir and proc is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self) -> Optional[subprocess.Popen]:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._signal(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
                try:
                    proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return proc

    @staticmethod
    def _signal(proc: subprocess.Popen, sig) -> None:
        try:
            if os.name == "posix":
                os.killpg(proc.pid, sig)
            elif sig == signal.SIGTERM:
                proc.terminate()
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass

    # ------------------------------------------------------------------ helpers
    def log_tail(self, max_chars: int = 8000) -> str:
        return tail(self.log_path, max_chars)

    def client(self, **kw) -> "LabelStudioClient":
        kw.setdefault("token", self.legacy_token)
        return LabelStudioClient(self.url, **kw)


class LabelStudioClient:
    """Minimal LS REST client. Auth: legacy ``token`` (``Authorization: Token ...``) or a personal
    access token ``pat`` (a JWT refresh token, exchanged at ``/api/token/refresh/`` for a short-lived
    access token sent as ``Authorization: Bearer ...``; re-exchanged once on 401)."""

    def __init__(self, url: str, token: Optional[str] = None, pat: Optional[str] = None,
                 timeout: float = 60.0):
        if bool(token) == bool(pat):
            raise ValueError("give exactly one of token= or pat=")
        self.url = url.rstrip("/")
        self.token = token
        self.pat = pat
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # never go through a proxy to 127.0.0.1
        self._access: Optional[str] = None

    # ------------------------------------------------------------------ plumbing
    def _auth_header(self, refresh: bool = False) -> dict:
        if self.token:
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or refresh:
            self._access = self.refresh_access_token(self.pat)
        return {"Authorization": f"Bearer {self._access}"}

    def refresh_access_token(self, pat: str) -> str:
        r = self.session.post(f"{self.url}/api/token/refresh/", json={"refresh": pat}, timeout=self.timeout)
        self._check(r)
        return r.json()["access"]

    def request(self, method: str, path: str, *, expect=(200, 201, 204), **kw) -> requests.Response:
        kw.setdefault("timeout", self.timeout)
        url = path if path.startswith("http") else f"{self.url}{path}"
        headers = dict(kw.pop("headers", None) or {})
        r = self.session.request(method, url, headers={**headers, **self._auth_header()}, **kw)
        if r.status_code == 401 and self.pat:
            r = self.session.request(method, url, headers={**headers, **self._auth_header(refresh=True)}, **kw)
        if expect is not None:
            self._check(r, expect)
        return r

    @staticmethod
    def _check(r: requests.Response, expect=(200, 201, 204)) -> None:
        if r.status_code not in expect:
            raise LabelStudioError(f"{r.request.method} {r.url} -> {r.status_code}: {r.text[:2000]}")

    def get(self, path, **kw):
        return self.request("GET", path, **kw).json()

    def post(self, path, json=None, **kw):
        r = self.request("POST", path, json=json, **kw)
        return r.json() if r.content else None

    # ------------------------------------------------------------------ users / tokens
    def whoami(self) -> dict:
        return self.get("/api/current-user/whoami")

    def create_pat(self) -> str:
        """Create a personal access token (``POST /api/token/``; a JWT refresh token, 200-year TTL by
        default). LS 1.23 allows one live PAT per user: a second call answers 409 "You already have a
        valid token" -- keep the first one (the e2e module caches it in a fixture)."""
        return self.post("/api/token/")["token"]

    def jwt_settings(self) -> dict:
        return self.get("/api/jwt/settings")

    def set_jwt_settings(self, *, api_tokens_enabled: bool = True, legacy_api_tokens_enabled: bool = True) -> dict:
        """Organization token settings; ``legacy_api_tokens_enabled=False`` is LS 1.23's default for
        a fresh organization (then ``Token <legacy>`` gets 401 everywhere, also on /data/upload)."""
        return self.post("/api/jwt/settings", json={"api_tokens_enabled": api_tokens_enabled,
                                                   "legacy_api_tokens_enabled": legacy_api_tokens_enabled})

    # ------------------------------------------------------------------ projects / tasks
    def create_project(self, title: str, label_config: str, **fields) -> int:
        return self.post("/api/projects", json={"title": title, "label_config": label_config, **fields})["id"]

    def project(self, project_id: int) -> dict:
        return self.get(f"/api/projects/{project_id}")

    def import_images(self, project_id: int, paths: Iterable) -> list:
        """Upload image (or video: ``.mp4``, ``.webm``, ``.mov``) files (multipart
        ``/api/projects/<id>/import``); one request per file so the returned task ids are in the order
        of ``paths``. Tasks get ``/data/upload/<pid>/<uuid>-<name>``."""
        task_ids = []
        for p in paths:
            p = Path(p)
            with open(p, "rb") as fh:
                res = self.post(f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                                files={p.name: (p.name, fh, _mime(p))})
            ids = res.get("task_ids") or []
            if len(ids) != 1:
                raise LabelStudioError(f"uploading {p} created tasks {ids}: {res}")
            task_ids.extend(ids)
        return task_ids

    def import_tasks(self, project_id: int, tasks: list) -> list:
        """Import task dicts (``[{"data": {"image": "/data/local-files/?d=..."}}, ...]``); returns
        the new task ids in order."""
        res = self.post(f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=tasks)
        ids = res.get("task_ids") or []
        if len(ids) != len(tasks):
            raise LabelStudioError(f"imported {len(tasks)} tasks, got ids {ids}: {res}")
        return ids

    def tasks(self, project_id: int) -> list:
        out, page = [], 1
        while True:
            r = self.request("GET", "/api/tasks", params={"project": project_id, "page": page, "page_size": 100},
                             expect=(200, 404))
            if r.status_code == 404:  # past the last page
                break
            body = r.json()
            batch = body["tasks"] if isinstance(body, dict) else body
            out.extend(batch)
            total = body.get("total", len(out)) if isinstance(body, dict) else len(out)
            if not batch or len(out) >= total:
                break
            page += 1
        return out

    def task(self, task_id: int) -> dict:
        return self.get(f"/api/tasks/{task_id}")

    def create_view(self, project_id: int, data: dict) -> int:
        """A Data Manager tab (``POST /api/dm/views``), e.g. ``data={"ordering": ["-tasks:id"],
        "filters": {"conjunction": "and", "items": [{"filter": "filter:tasks:id", "operator":
        "not_equal", "type": "Number", "value": 3}]}}``; tabs come in the order they were made."""
        return self.post("/api/dm/views", json={"project": project_id, "data": data})["id"]

    def add_local_files_storage(self, project_id: int, path, title: str = "local files",
                                regex_filter: str = r".*\.(png|jpe?g)$", use_blob_urls: bool = True) -> int:
        """Register ``path`` (a dir under the server's ``local_files_root``) as a local-files import
        storage. LS only serves ``/data/local-files/?d=<rel>`` for files under such a storage."""
        return self.post("/api/storages/localfiles/", json={
            "project": project_id, "path": str(path), "title": title,
            "regex_filter": regex_filter, "use_blob_urls": use_blob_urls})["id"]

    def sync_local_files_storage(self, storage_id: int) -> dict:
        return self.post(f"/api/storages/localfiles/{storage_id}/sync", timeout=ML_CALL_TIMEOUT)

    def add_s3_storage(self, project_id: int, bucket: str, *, endpoint: str, prefix: str = "",
                       presign: bool = True, title: str = "s3", regex_filter: str = r".*\.(png|jpe?g)$",
                       access_key: str = "testing", secret_key: str = "testing",
                       region: str = "us-east-1") -> int:
        """An S3 import storage (``POST /api/storages/s3/``) on an S3-compatible ``endpoint``
        (``s3_endpoint``), with every object as a task (``use_blob_urls``: task data
        ``s3://<bucket>/<key>``). ``presign``: LS answers ``/tasks/<id>/presign/`` with a 303 to a
        pre-signed URL (True) or streams the object itself (False). A loopback endpoint needs
        ``SSRF_PROTECTION_ENABLED=false`` on LS (the harness sets it)."""
        return self.post("/api/storages/s3/", json={
            "project": project_id, "title": title, "bucket": bucket, "prefix": prefix,
            "regex_filter": regex_filter, "use_blob_urls": True, "presign": presign, "presign_ttl": 15,
            "aws_access_key_id": access_key, "aws_secret_access_key": secret_key,
            "region_name": region, "s3_endpoint": endpoint})["id"]

    def sync_s3_storage(self, storage_id: int) -> dict:
        return self.post(f"/api/storages/s3/{storage_id}/sync", timeout=ML_CALL_TIMEOUT)

    # ------------------------------------------------------------------ ML backend
    def connect_ml_backend(self, project_id: int, url: str, title: str, is_interactive: bool = True,
                           **fields) -> int:
        """``POST /api/ml``: LS calls the backend's ``GET /health`` and ``POST /setup`` (twice each:
        serializer validation, then ``update_state`` after saving) before answering."""
        body = {"project": project_id, "url": url, "title": title, "is_interactive": is_interactive, **fields}
        return self.post("/api/ml", json=body, timeout=ML_CALL_TIMEOUT)["id"]

    def ml_backend(self, ml_id: int) -> dict:
        """``GET /api/ml/<id>``; note LS refreshes the state (health + setup) on every read."""
        return self.get(f"/api/ml/{ml_id}", timeout=ML_CALL_TIMEOUT)

    def retrieve_predictions(self, project_id: int, task_ids: Optional[list] = None) -> dict:
        """Data Manager action "Retrieve Predictions" (``retrieve_tasks_predictions``) on all tasks of
        the project, or on ``task_ids``. Synchronous in LS OSS: it returns after the backend's /predict
        answered (or failed: LS then only logs the error). Tasks that already have a prediction with
        the backend's current ``model_version`` are not sent again."""
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": list(task_ids)}
        return self.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
                         json={"selectedItems": selected}, timeout=ML_CALL_TIMEOUT)

    def interactive_annotating(self, ml_id: int, task_id: int, context: Optional[dict] = None) -> dict:
        """``POST /api/ml/<id>/interactive-annotating`` (what the labeling UI sends when a smart tool
        or the prompt TextArea submits). Answers 200 with ``{"data": <first result>}`` or
        ``{"errors": [...]}``; nothing is stored."""
        body = {"task": task_id}
        if context is not None:
            body["context"] = context
        return self.post(f"/api/ml/{ml_id}/interactive-annotating", json=body, timeout=ML_CALL_TIMEOUT)

    def predictions(self, task_id: int) -> list:
        return self.get("/api/predictions/", params={"task": task_id})


def _mime(p: Path) -> str:
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".mp4": "video/mp4",
            ".webm": "video/webm", ".mov": "video/quicktime"}.get(p.suffix.lower(), "application/octet-stream")
