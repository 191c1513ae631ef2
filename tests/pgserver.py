"""PostgreSQL for Label Studio's production setup (``DJANGO_DB=default``) in the e2e tests.

Where a server accepts connections on 127.0.0.1:5432 as ``postgres`` without a password (this
project's CI machines), it is used. Otherwise, where Debian's PostgreSQL server binaries are
installed (``ensure_postgres`` in scripts/bootstrap.sh installs them when run as root), the suite
starts a cluster of its own in a temp dir on a free port (as the ``postgres`` user when the tests
run as root: ``initdb`` refuses root). Each test creates its own database and drops it after.

SQL goes through ``psycopg`` in Label Studio's own venv (LS needs it for PostgreSQL anyway), so
the backend's venv gets no database driver.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import free_port

MACHINE_PORT = 5432


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _server_bin_dir() -> Path | None:
    """Debian keeps initdb and postgres in /usr/lib/postgresql/<version>/bin (not on PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 (``port``) with a passwordless superuser ``postgres``."""

    port: int
    ls_python: str
    process: subprocess.Popen | None = None
    data_dir: Path | None = None
    databases: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    user: str = "postgres"

    @classmethod
    def find_or_start(cls, ls_python: str) -> "PostgresServer | None":
        """The machine's server, else one of our own, else None (neither is available)."""
        if _accepts("127.0.0.1", MACHINE_PORT):
            server = cls(MACHINE_PORT, ls_python)
            try:
                server.sql("SELECT 1")
                return server
            except subprocess.CalledProcessError:
                pass  # something else on 5432, or it wants a password: start our own
        bin_dir = _server_bin_dir()
        return cls._start_own(bin_dir, ls_python) if bin_dir else None

    @classmethod
    def _start_own(cls, bin_dir: Path, ls_python: str) -> "PostgresServer":
        root = Path(tempfile.mkdtemp(prefix="pg-e2e-"))
        data_dir, port = root / "data", free_port()
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_postgres:
            shutil.chown(root, user="postgres")
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True)
        process = subprocess.Popen([*as_postgres, str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port),
                                    "-h", "127.0.0.1", "-k", str(root), "-c", "fsync=off"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        server = cls(port, ls_python, process=process, data_dir=root)
        deadline = time.monotonic() + 60
        while not _accepts("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"our PostgreSQL did not start on port {port} (exit {process.poll()})")
            time.sleep(0.2)
        return server

    def sql(self, statement: str) -> None:
        code = ("import psycopg, sys\n"
                "with psycopg.connect(host=sys.argv[1], port=int(sys.argv[2]), user=sys.argv[3], dbname='postgres',"
                " autocommit=True, connect_timeout=5) as c:\n    c.execute(sys.argv[4])")
        subprocess.run([self.ls_python, "-c", code, self.host, str(self.port), self.user, statement], check=True,
                       capture_output=True, timeout=60)

    def create_database(self, name: str) -> dict[str, str]:
        """Create ``name``; returns the env that points Label Studio at it."""
        self.sql(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return {"DJANGO_DB": "default", "POSTGRE_NAME": name, "POSTGRE_USER": self.user, "POSTGRE_PASSWORD": "",
                "POSTGRE_HOST": self.host, "POSTGRE_PORT": str(self.port)}

    def stop(self) -> None:
        for name in self.databases:
            try:
                self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except subprocess.CalledProcessError:
                pass  # the server is going away or the database is gone already
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
