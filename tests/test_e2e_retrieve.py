"""End-to-end: LS 1.23's own "Retrieve predictions" on a selection that needs longer than
RETRIEVE_BUDGET. LS's request returns within the budget with the finished tasks' predictions; the
rest is labeled by a bulk run of the backend that writes back through the LS API; every task ends
with exactly one prediction of the backend's model version.

The session's LS (tests/conftest.py ``label_studio``) and a real backend process (``start_backend``).
Whether a task can be finished in time is decided by an image host that holds its images until the
test opens a gate, not by timing: without the budget LS's request would hang until LS gives up
(``ML_TIMEOUT_PREDICT``, 100 s) and store nothing.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import requests

from tests.test_e2e_label_studio import connect, logs_on_failure
from tests.test_http import CONFIG
from tests.test_retrieve import gate, gated_project  # noqa: F401 - gate is a fixture

pytestmark = pytest.mark.e2e

RUN_ID = re.compile(r"deferred to bulk run ([0-9a-f]{16})")


def versions(ls, task_ids) -> dict[int, Counter]:
    return {t: Counter(p["model_version"] for p in ls.predictions(t)) for t in task_ids}


def test_retrieve_predictions_on_a_slow_selection_answers_in_time_and_labels_the_rest(label_studio, ls, gate,
                                                                                     start_backend):
    project, ids, data = gated_project(ls, gate, "e2e retrieve budget")
    fast, slow = ids[:4], ids[4:]

    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token,
                            RETRIEVE_BUDGET="2", ALLOW_PRIVATE_URLS="true", DOWNLOAD_READ_TIMEOUT="120",
                            ALLOW_UNAUTHENTICATED_BULK="true", PREWARM_TASKS="0")
    with logs_on_failure(label_studio, backend):
        warm = {"tasks": [{"id": fast[0], "data": data[0]}], "label_config": CONFIG}
        assert requests.post(f"{backend.url}/predict", json=warm, timeout=120).status_code == 200  # models loaded
        connect(ls, project, backend, "grounded-sam retrieve budget")
        model_version = requests.get(f"{backend.url}/health", timeout=5).json()["model_version"]

        # the gate is closed: 8 of the 12 tasks cannot be labeled now, yet LS's request returns
        started = time.monotonic()
        ls.retrieve_predictions(project)
        print(f"[e2e] Retrieve predictions on 12 tasks, RETRIEVE_BUDGET=2: {time.monotonic() - started:.1f} s")
        now = versions(ls, ids)
        assert all(now[t] == Counter({model_version: 1}) for t in fast), now  # LS stored the answered ones
        assert all(not now[t] for t in slow), now  # and nothing for the deferred ones ([] stores nothing)
        run_id, = RUN_ID.findall(backend.log_text())

        # a second click while the run waits for its images: LS sends the 8, the backend leaves them to the run
        ls.retrieve_predictions(project)
        assert all(not c for c in versions(ls, slow).values())
        assert len(RUN_ID.findall(backend.log_text())) == 1

        gate.gate.set()
        deadline = time.monotonic() + 60
        while (status := requests.get(f"{backend.url}/jobs/{run_id}", timeout=5).json())["status"] in (
                "planning", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (status["status"], status["total"], status["done"], status["failed"]) == ("done", 8, 8, 0), status
        final = versions(ls, ids)
        assert all(final[t] == Counter({model_version: 1}) for t in ids), final
