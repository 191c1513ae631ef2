"""An engine per project: a project chooses its engine (``extra_params.engine`` / ``model_version``)
and only that engine answers it, in queue mode (a queue per engine, real workers of two tiny
engines on one real Redis, a real Label Studio for bulk runs) and in embedded mode (ENGINES)."""

import collections
import time

import pytest
import requests

from backend.errors import EngineNotServed
from backend.ls.engines import choose_engine
from backend.ls.options import OptionsError, PredictOptions
from backend.settings import EngineKind, Settings, SettingsError
from tests.test_bulk import image_uri, task_ids, wait_for_run, worker_env
from tests.test_http import CONFIG, GOOD, body

GROUNDED_VERSION = "grounding-dino+sam"  # the tiny models' names (tests/test_bulk.py MODEL_VERSION)
SAM3_VERSION = "sam3"


# ---------------------------------------------------------------- settings and choice (no process)

def test_engines_setting_defaults_to_engine_and_must_hold_it():
    assert Settings.from_env({}).engines == (EngineKind.GROUNDED_SAM,)
    both = Settings.from_env({"ENGINES": "sam3, grounded-sam"})
    assert both.engine is EngineKind.SAM3 and both.engines == (EngineKind.SAM3, EngineKind.GROUNDED_SAM)
    assert Settings.from_env({"ENGINES": "grounded-sam,sam3", "ENGINE": "sam3"}).engine is EngineKind.SAM3
    with pytest.raises(SettingsError, match="ENGINE=sam3 is not one of ENGINES"):
        Settings.from_env({"ENGINES": "grounded-sam", "ENGINE": "sam3"})
    with pytest.raises(SettingsError, match="ENGINES='sam4' is not an engine"):
        Settings.from_env({"ENGINES": "grounded-sam,sam4"})


def test_extra_params_engine_and_model_version_are_validated():
    assert PredictOptions.from_json({"engine": "SAM3"}).engine == "sam3"
    assert PredictOptions.from_json({"model_version": " v2 "}).model_version == "v2"
    with pytest.raises(OptionsError, match=r"extra_params.engine must be one of \['grounded-sam', 'sam3'\]"):
        PredictOptions.from_json({"engine": "yolo"})
    with pytest.raises(OptionsError, match="extra_params.model_version"):
        PredictOptions.from_json({"model_version": ""})


def test_the_choice_resolves_against_what_is_served():
    served = {"grounded-sam": ["a"], "sam3": ["b"]}
    assert choose_engine(PredictOptions(), "grounded-sam", served) == "grounded-sam"
    assert choose_engine(PredictOptions(engine="sam3"), "grounded-sam", served) == "sam3"
    assert choose_engine(PredictOptions(model_version="b"), "grounded-sam", served) == "sam3"
    with pytest.raises(EngineNotServed, match="model_version 'c'.*grounded-sam: a; sam3: b"):
        choose_engine(PredictOptions(model_version="c"), "grounded-sam", served)
    with pytest.raises(EngineNotServed):  # the version is served, but by another engine than the one chosen
        choose_engine(PredictOptions(engine="grounded-sam", model_version="b"), "grounded-sam", served)


# ---------------------------------------------------------------- helpers

def setup(url: str, project: int, extra_params=None) -> requests.Response:
    return requests.post(f"{url}/setup", json={"project": f"{project}.1700000000", "schema": CONFIG,
                                               "extra_params": extra_params}, timeout=30)


def predict(url: str, project: int, timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/predict", json={**body(GOOD, prompt="cat"), "project": f"{project}.1700000000"},
                         timeout=timeout)


def versions_of(response: requests.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {p["model_version"] for p in response.json()["results"]}


# ---------------------------------------------------------------- queue mode: two engines, one Redis

@pytest.fixture(scope="module")
def two_engines(redis_server, start_worker, start_backend, label_studio, tiny_family):
    """A Grounded-SAM worker and a SAM 3 worker on one Redis, and a web process whose default is
    Grounded-SAM; all pointed at the session's Label Studio (bulk runs write back there)."""
    grounded = start_worker(redis_server.url, **worker_env(label_studio))
    sam3 = start_worker(redis_server.url, ENGINE="sam3", SAM3_MODEL=str(tiny_family("sam3")),
                        **worker_env(label_studio))
    web = start_backend(REDIS_URL=redis_server.url, ALLOW_UNAUTHENTICATED_BULK="true", RETRIEVE_BUDGET="0",
                        **worker_env(label_studio))
    return web, grounded, sam3


@pytest.mark.e2e
def test_each_project_is_answered_by_its_own_engine(two_engines):
    web, _, _ = two_engines
    chosen = setup(web.url, 71, {"engine": "sam3"})  # LS keeps the answer's version as the project's
    assert chosen.status_code == 200 and chosen.json()["model_version"] == SAM3_VERSION
    assert setup(web.url, 72).status_code == 200
    assert setup(web.url, 73, {"model_version": SAM3_VERSION}).status_code == 200
    bad = setup(web.url, 74, {"model_version": "nobody-serves-this"})
    assert bad.status_code == 400 and "nobody-serves-this" in bad.json()["message"]
    for _ in range(2):  # several calls: a project never lands on the other engine's worker
        assert versions_of(predict(web.url, 71)) == {SAM3_VERSION}
        assert versions_of(predict(web.url, 72)) == {GROUNDED_VERSION}
        assert versions_of(predict(web.url, 73)) == {SAM3_VERSION}
    health = requests.get(f"{web.url}/health", timeout=2).json()
    assert health["engine"] == "grounded-sam"
    assert {e: h["model_versions"] for e, h in health["engines"].items()} == {
        "grounded-sam": [GROUNDED_VERSION], "sam3": [SAM3_VERSION]}
    assert set(health["engines"]["sam3"]["models"][SAM3_VERSION]) == {"SAM3_MODEL"}  # what the worker declared
    assert health["engines"]["grounded-sam"]["workers"] == 1
    versions = requests.get(f"{web.url}/versions", timeout=2).json()
    assert set(versions["versions"]) == {GROUNDED_VERSION, SAM3_VERSION}
    settings = requests.get(f"{web.url}/projects/71/settings", timeout=2).json()
    assert settings["engine"] == "sam3" and settings["engine_served"] is True
    assert settings["options"] == {"engine": "sam3"}
    assert requests.get(f"{web.url}/projects/72/settings", timeout=2).json()["engine"] == "grounded-sam"


@pytest.mark.e2e
def test_bulk_runs_go_to_the_projects_engine(two_engines, ls):
    web, _, _ = two_engines
    projects = {}
    for engine in ("sam3", "grounded-sam"):
        project = ls.create_project(f"engine {engine}", CONFIG)
        ls.import_tasks(project, [{"image": image_uri(i)} for i in range(5)])
        assert setup(web.url, project, {"engine": engine}).status_code == 200
        started = requests.post(f"{web.url}/prelabel", json={"project": project, "chunk": 2}, timeout=30)
        assert started.status_code == 202, started.text
        projects[engine] = (project, started.json()["id"])
    expected = {"sam3": SAM3_VERSION, "grounded-sam": GROUNDED_VERSION}
    for engine, (project, run_id) in projects.items():
        status = wait_for_run(web.url, run_id, lambda s: s["status"] in {"done", "failed", "cancelled"})
        assert status["status"] == "done" and status["model_version"] == expected[engine], status
        per_task = collections.Counter()
        for prediction in ls.request("GET", f"/api/predictions/?project={project}").json():
            per_task[(prediction["task"], prediction["model_version"])] += 1
        assert set(per_task) == {(task, expected[engine]) for task in task_ids(ls, project)}
        assert set(per_task.values()) == {1}


@pytest.mark.e2e
def test_a_project_whose_engine_has_no_live_worker_gets_503_naming_it(two_engines):
    web, _, sam3 = two_engines
    assert setup(web.url, 75, {"engine": "sam3"}).status_code == 200
    sam3.stop()  # a SIGTERM: the worker leaves the liveness set as it stops
    deadline = time.monotonic() + 30
    while (answer := predict(web.url, 75)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert answer.status_code == 503, answer.text
    message = answer.json()["message"]
    assert "'sam3'" in message and "ENGINE=sam3 python -m backend worker" in message
    assert versions_of(predict(web.url, 76)) == {GROUNDED_VERSION}  # the other engine still answers
    settings = requests.get(f"{web.url}/projects/75/settings", timeout=2).json()
    assert settings["engine"] == "sam3" and settings["engine_served"] is False


# ---------------------------------------------------------------- embedded mode: ENGINES

@pytest.mark.e2e
def test_embedded_engines_load_several_engines_in_one_process(start_backend, tiny_family):
    both = start_backend(ENGINES="grounded-sam,sam3", SAM3_MODEL=str(tiny_family("sam3")))
    assert setup(both.url, 81, {"engine": "sam3"}).status_code == 200
    assert setup(both.url, 82, {"engine": "grounded-sam"}).status_code == 200
    assert versions_of(predict(both.url, 81)) == {SAM3_VERSION}
    assert versions_of(predict(both.url, 82)) == {GROUNDED_VERSION}
    assert versions_of(predict(both.url, 83)) == {GROUNDED_VERSION}  # no choice: ENGINES' first
    assert set(requests.get(f"{both.url}/versions", timeout=2).json()["versions"]) == {GROUNDED_VERSION, SAM3_VERSION}
    one = start_backend()  # the default: one engine
    refused = setup(one.url, 84, {"engine": "sam3"})
    assert refused.status_code == 400 and "ENGINES=grounded-sam" in refused.json()["message"]
