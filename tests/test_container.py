"""The project's Dockerfile built (unchanged, base image made locally) and its image run, with buildah.

Embedded mode: the image's own CMD answers /health and /predict on tiny models made inside the image
by ``python -m backend make-tiny-models``; queue mode: a worker container running the compose file's
worker command and a web container running the image's CMD, both on a redis-server on the host.
The image's HEALTHCHECK and the compose file's worker healthcheck run inside the image.
Cost: cold ~11 min (debootstrap ~3.5, pip installs in the build ~7), ~1 min when cached.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests import compose
from tests.conftest import wait_until_up
from tests.containers import Container, build_image, healthcheck_command, image_config
from tests.processes import free_port
from tests.test_http import GOOD, body

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/grounded-sam-backend:ci"
TINY_IMAGE = "localhost/grounded-sam-backend:ci-tiny"
TINY = "/home/app/tiny"  # inside the image, written by the image's user
TINY_ENV = {"GROUNDING_DINO_MODEL": f"{TINY}/grounding-dino", "SAM_MODEL": f"{TINY}/sam",
            "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5"}


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory) -> str:
    """The built image plus tiny models made in it by the image's own CLI, committed as a tag."""
    build_image(IMAGE, tmp_path_factory.mktemp("build") / "build.log")
    container = Container.from_image(IMAGE)
    try:
        made = container.exec(["python", "-m", "backend", "make-tiny-models", TINY], timeout=300)
        assert made.returncode == 0, made.stdout + made.stderr
        container.commit(TINY_IMAGE)
    finally:
        container.remove()
    return TINY_IMAGE


@pytest.fixture
def containers():
    made: list[Container] = []

    def make() -> Container:
        made.append(Container.from_image(TINY_IMAGE))
        return made[-1]

    yield make
    for container in made:
        container.remove()


def predict_regions(url: str) -> list[dict]:
    response = requests.post(f"{url}/predict", json=body(GOOD, prompt="cat"), timeout=120)
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    return result["result"]


@pytest.mark.timeout(2400)  # the first test builds the image: ~11 min cold on 2 cores
def test_embedded_image_serves_predict_and_passes_its_healthcheck(tiny_image, containers, tmp_path):
    config = image_config(tiny_image)
    assert config["User"] == "app" and config["WorkingDir"] == "/app"
    port = free_port()
    server = containers()
    log = tmp_path / "web.log"
    process = server.start(config["Cmd"], {**TINY_ENV, "PORT": str(port), "THREADS": "2"}, log)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process, log, deadline_s=120)
    health = requests.get(f"{url}/health", timeout=5).json()
    assert health["status"] == "UP" and health["mode"] == "embedded"
    assert health["models"]["SAM_MODEL"] == TINY_ENV["SAM_MODEL"]
    regions = predict_regions(url)
    assert {region["type"] for region in regions} == {"rectanglelabels", "brushlabels"}
    assert all(region["value"]["rle"] for region in regions if region["type"] == "brushlabels")

    # The image's HEALTHCHECK, run in the image as the runtime would, passes while it serves...
    check = healthcheck_command(config["Healthcheck"]["Test"])
    probe = server.exec(check, {"PORT": str(port)})
    assert probe.returncode == 0, probe.stderr
    # ...and fails once it has stopped (the check is not vacuous).
    Container.stop(process)
    assert server.exec(check, {"PORT": str(port)}).returncode != 0


def test_queue_mode_worker_and_web_containers_on_host_redis(tiny_image, containers, redis_server, tmp_path):
    services = compose.load([REPO / "docker-compose.yml"], {"REDIS_PASSWORD": "unused-here"})["services"]
    env = {**TINY_ENV, "REDIS_URL": redis_server.url}  # the host's Redis, no password (loopback only)
    worker = containers()
    worker_process = worker.start(services["worker"]["command"], {**env, "WORKER_THREADS": "1"},
                                  tmp_path / "worker.log")
    port = free_port()
    web = containers()
    web_log = tmp_path / "web.log"
    web_process = web.start(image_config(tiny_image)["Cmd"],
                            {**env, "PORT": str(port), "THREADS": "2", "PREDICT_TIMEOUT": "10"}, web_log)
    url = f"http://127.0.0.1:{port}"
    # /health answers DEGRADED (503) until the worker has registered in Redis.
    wait_until_up(url, web_process, web_log, deadline_s=120, statuses=(200, 503))
    deadline = time.monotonic() + 120
    # ("workers" is absent while a Redis round trip takes over ~0.5 s: a loaded host, not a failure)
    while (health := requests.get(f"{url}/health", timeout=5).json()).get("workers", 0) < 1:
        assert worker_process.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"no worker registered: {health}"
        time.sleep(0.5)
    assert health["mode"] == "queue" and health["status"] == "UP"
    regions = predict_regions(url)
    assert {region["type"] for region in regions} == {"rectanglelabels", "brushlabels"}

    # The compose file's worker healthcheck, in the worker's image with its REDIS_URL.
    worker_check = healthcheck_command(services["worker"]["healthcheck"]["test"])
    probe = worker.exec(worker_check, {"REDIS_URL": redis_server.url})
    assert probe.returncode == 0, probe.stderr
    refused = worker.exec(worker_check, {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert refused.returncode != 0
    # web has no healthcheck of its own in compose: the image's applies, and passes in queue mode.
    assert "healthcheck" not in services["web"]
    web_check = healthcheck_command(image_config(tiny_image)["Healthcheck"]["Test"])
    assert web.exec(web_check, {"PORT": str(port)}).returncode == 0

    # The predictions came from the worker container: without it the web container cannot answer.
    Container.stop(worker_process)
    response = requests.post(f"{url}/predict", json=body(GOOD, prompt="cat"), timeout=60)
    assert response.status_code in (503, 504), response.text
