"""The compose files, checked as `docker compose config` would (no Docker here), and one GPU per worker.

The healthchecks of the backend's services are run inside the built image by test_container.py;
Redis's (its image cannot be pulled here) runs against a real redis-server started with the
compose file's own command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import compose
from tests.processes import free_port

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "docker-compose.yml"
CPU = REPO / "docker-compose.cpu.yml"
ENV = {"REDIS_PASSWORD": "s3cretpassw0rd"}


def gpu_override(tmp_path: Path, gpus: str) -> Path:
    """Run the real generator script and keep its output as a file, as the README says to."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "compose_gpus.py"), gpus],
                          capture_output=True, text=True, check=True)
    path = tmp_path / "docker-compose.gpus.yml"
    path.write_text(done.stdout)
    return path


def started(model: dict) -> dict:
    """The services `docker compose up` starts with no profile enabled."""
    return {name: service for name, service in model["services"].items() if not service.get("profiles")}


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_base_file_runs_one_worker_on_one_named_gpu():
    model = compose.load([BASE], ENV)
    assert set(started(model)) == {"redis", "web", "worker"}
    worker = model["services"]["worker"]
    assert "replicas" not in worker["deploy"]
    assert gpu_devices(worker) == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert gpu_devices(compose.load([BASE], {**ENV, "WORKER_GPU": "3"})["services"]["worker"])[0]["device_ids"] == ["3"]
    assert model["services"]["web"]["environment"]["REDIS_URL"] == "redis://:s3cretpassw0rd@redis:6379/0"
    assert not gpu_devices(model["services"]["web"])


def test_workers_keep_their_compile_cache_in_a_named_volume(tmp_path):
    """COMPILE=1: a restarted worker reuses the compiled graphs (COMPILE_CACHE_DIR on a volume)."""
    for files in ([BASE], [BASE, CPU], [BASE, gpu_override(tmp_path, "0,1")]):
        model = compose.load(files, ENV)
        assert "compile-cache" in model["volumes"]
        workers = [s for name, s in started(model).items() if name.startswith("worker")]
        assert workers, files
        for worker in workers:
            assert worker["environment"]["COMPILE_CACHE_DIR"] == "/data/compile-cache"
            assert "compile-cache:/data/compile-cache" in worker["volumes"]
            assert "hf-cache:/data/hf" in worker["volumes"]  # the anchor's volumes are still there


def test_redis_password_is_required():
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        compose.load([BASE], {})
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        compose.load([BASE], {"REDIS_PASSWORD": ""})  # `:?` refuses an empty value too


def test_the_schema_check_is_not_vacuous(tmp_path):
    typo = tmp_path / "typo.yml"
    typo.write_text("services:\n  worker:\n    helthcheck:\n      test: [CMD, 'true']\n")
    with pytest.raises(ValueError, match="helthcheck"):
        compose.load([BASE, typo], ENV)


def test_cpu_override_drops_gpus_and_scales_replicas():
    model = compose.load([BASE, CPU], {**ENV, "WORKER_REPLICAS": "3"})
    worker = model["services"]["worker"]
    assert worker["deploy"] == {"replicas": "3"}  # `!reset` removed the GPU reservation
    assert worker["build"]["args"]["TORCH_INDEX"] == "" == model["services"]["web"]["build"]["args"]["TORCH_INDEX"]
    assert compose.load([BASE, CPU], ENV)["services"]["worker"]["deploy"]["replicas"] == "1"


def test_generated_override_gives_each_worker_its_own_gpu(tmp_path):
    model = compose.load([BASE, gpu_override(tmp_path, "0,1,2,3")], ENV)
    services = started(model)
    assert set(services) == {"redis", "web", "worker-gpu0", "worker-gpu1", "worker-gpu2", "worker-gpu3"}
    assert model["services"]["worker"]["profiles"] == ["single-gpu"]  # kept, but not started
    devices = {}
    for name in ("worker-gpu0", "worker-gpu1", "worker-gpu2", "worker-gpu3"):
        service = services[name]
        assert "replicas" not in service["deploy"], name
        [device] = gpu_devices(service)
        assert "count" not in device and device["capabilities"] == ["gpu"], name
        devices[name] = device["device_ids"]
        # A copy of the worker in everything but its device.
        for key in ("command", "environment", "healthcheck", "image", "volumes", "depends_on"):
            assert service[key] == model["services"]["worker"][key], (name, key)
    assert devices == {f"worker-gpu{i}": [str(i)] for i in range(4)}


def test_generated_override_takes_uuids_and_refuses_bad_lists(tmp_path):
    model = compose.load([BASE, gpu_override(tmp_path, "GPU-5f2c0a1e-aaaa,3")], ENV)
    assert gpu_devices(model["services"]["worker-gpuGPU-5f2c0a1e-aaaa"])[0]["device_ids"] == ["GPU-5f2c0a1e-aaaa"]
    for bad, reason in (("0,0", "once"), ("x", "not a GPU"), ("", "comma-separated")):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "compose_gpus.py"), bad],
                              capture_output=True, text=True)
        assert done.returncode == 2 and reason in done.stderr, (bad, done.stderr)


def test_redis_healthcheck_passes_with_the_compose_password_only(tmp_path):
    """Compose's own redis command (plus a free port) and its healthcheck, against a real server."""
    redis_service = compose.load([BASE], ENV)["services"]["redis"]
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is missing: it comes with redis-server (apt-get install redis-server)")
    port = free_port()
    command = list(redis_service["command"])
    assert command[:2] == ["sh", "-c"]
    command[2] += f" --port {port} --bind 127.0.0.1 --save ''"
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", **redis_service["environment"]}
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        test = redis_service["healthcheck"]["test"]
        assert test[0] == "CMD"
        check = [*test[1:2], "-p", str(port), *test[2:]]
        deadline = time.monotonic() + 10
        while True:
            done = subprocess.run(check, env=env, capture_output=True, text=True)
            if done.stdout.strip() == "PONG" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert done.stdout.strip() == "PONG", done
        # Without REDISCLI_AUTH the same check fails: the password is what makes it pass.
        anonymous = subprocess.run(check, env={"PATH": env["PATH"]}, capture_output=True, text=True)
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
