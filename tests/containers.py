"""The project's image built and run with buildah (no Docker daemon, no registry, no OCI runtime here).

``buildah run --isolation chroot`` runs a process in the image's filesystem, as the image's user, in
its working directory and environment, sharing the host's network: a server in it listens on the
host's loopback, so tests reach it (and it reaches the host's redis-server) on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def buildah(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def host_pip_settings() -> dict[str, list[str]]:
    """pip's settings on this host, from its config files and PIP_* variables (``pip config list``).

    ``{"find-links": [...], "cert": [...], "index-url": [...], "extra-index-url": [...]}``, each
    list in pip's order (environment first; repeats kept), space-separated values split.
    """
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    settings: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.cert='...'
        key, _, value = line.partition("=")
        values = value.strip().strip("'\"").split()
        settings.setdefault(key.rsplit(".", 1)[-1], []).extend(values)
    return settings


def pip_build_options(settings: dict[str, list[str]] | None = None) -> list[str]:
    """The host's pip setup carried into ``buildah bud`` with the Dockerfile's documented PIP_* args.

    Local wheelhouses (find-links directories: here the CPU torch wheel, without which pip would
    take PyPI's CUDA build) are mounted read-only at /wheels/<n>; the host's CA bundle (pip's cert,
    else the system one) at /etc/pip-ca.pem, so pip trusts what the host trusts; http(s) index URLs
    pass through.
    """
    settings = host_pip_settings() if settings is None else settings
    options: list[str] = []
    links = list(dict.fromkeys(part for part in settings.get("find-links", []) if Path(part).is_dir()))
    if links:
        targets = [f"/wheels/{n}" for n in range(len(links))]
        for source, target in zip(links, targets):
            options += ["-v", f"{source}:{target}:ro"]
        options += ["--build-arg", "PIP_FIND_LINKS=" + " ".join(targets)]
    ca = next((Path(c) for c in settings.get("cert", []) if Path(c).is_file()), HOST_CA)
    if ca.is_file():
        options += ["-v", f"{ca}:/etc/pip-ca.pem:ro", "--build-arg", "PIP_CERT=/etc/pip-ca.pem"]
    for name in ("index-url", "extra-index-url"):
        urls = list(dict.fromkeys(u for u in settings.get(name, []) if u.startswith(("http://", "https://"))))
        if urls:
            options += ["--build-arg", f"PIP_{name.upper().replace('-', '_')}={' '.join(urls[:1] if name == 'index-url' else urls)}"]
    return options


def build_image(tag: str, log_path: Path) -> None:
    """scripts/build-base-image.sh (cached by tag), then the project's Dockerfile, layers cached."""
    with log_path.open("w") as log:
        base = subprocess.run([str(REPO / "scripts" / "build-base-image.sh")], stdout=log, stderr=subprocess.STDOUT,
                              timeout=900)
        if base.returncode != 0:
            raise RuntimeError(f"build-base-image.sh failed:\n{log_path.read_text()[-3000:]}")
        bud = subprocess.run(["buildah", "bud", "--isolation", "chroot", "--pull=never", "--layers", "--format", "docker",
                              *pip_build_options(), "-t", tag, "-f", str(REPO / "Dockerfile"), str(REPO)],
                             stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    if bud.returncode != 0:
        raise RuntimeError(f"buildah bud failed:\n{log_path.read_text()[-3000:]}")


def image_config(tag: str) -> dict:
    """The Docker-format config of ``tag``: ``Cmd``, ``Env``, ``User``, ``WorkingDir``, ``Healthcheck``."""
    return json.loads(buildah("inspect", "--type", "image", tag).stdout)["Docker"]["config"]


def healthcheck_command(test: list[str]) -> list[str]:
    """A Docker/Compose healthcheck ``test`` as the argv the runtime executes."""
    kind, *rest = test
    if kind == "CMD":
        return rest
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", rest[0]]
    raise ValueError(f"unsupported healthcheck form {kind!r}: use CMD or CMD-SHELL")


@dataclass
class Container:
    """A buildah working container made from an image; processes run in it with ``start``/``exec``."""

    name: str
    started: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def from_image(cls, tag: str) -> "Container":
        return cls(buildah("from", "--pull=never", tag).stdout.strip())

    def _argv(self, command: list[str], env: dict[str, str]) -> list[str]:
        flags = [item for key, value in env.items() for item in ("--env", f"{key}={value}")]
        return ["buildah", "run", "--isolation", "chroot", *flags, self.name, "--", *command]

    def start(self, command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        """Start ``command`` in the background, output to ``log_path``; stopped by ``remove``."""
        with log_path.open("w") as log:
            process = subprocess.Popen(self._argv(command, env), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started.append(process)
        return process

    def exec(self, command: list[str], env: dict[str, str] | None = None, timeout: float = 60
             ) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(command, env or {}), capture_output=True, text=True, timeout=timeout)

    @staticmethod
    def stop(process: subprocess.Popen, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole process group, as ``docker stop`` signals PID 1; SIGKILL after ``grace_s``.

        buildah, its chroot runtime and the command share the session started for them; buildah
        itself exits at once, so wait until the command (e.g. gunicorn's graceful shutdown) is gone.
        """
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                process.poll()  # reap buildah so only live members keep the group alive
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                continue
            break
        process.wait(timeout=10)

    def commit(self, tag: str) -> None:
        buildah("commit", "--quiet", "--format", "docker", self.name, tag, timeout=600)

    def remove(self) -> None:
        for process in self.started:
            self.stop(process)
        buildah("rm", self.name, check=False)
