"""End-to-end with Label Studio on PostgreSQL (``DJANGO_DB=default``), how production runs it.

A second LS server of its own (the session's LS runs on sqlite), on a database this module creates
and drops (tests/pgserver.py: the machine's PostgreSQL, or one the suite starts). The backend's
side does not change with LS's database; what this checks is that the whole loop — project,
import, ML backend connection, "Retrieve predictions" stored as predictions, an interactive call
— works against an LS whose ids, JSON fields and transactions are PostgreSQL's. Its first start
runs every migration on PostgreSQL (about a minute on 2 cores).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.lsharness import LabelStudioServer, is_ci, label_studio_bin_or_skip
from tests.pgserver import PostgresServer
from tests.test_e2e_label_studio import (  # noqa: F401 - ``images`` is a fixture
    IMAGE_SIZES, LABEL_CONFIG, check_result, check_stored_predictions, connect, images, logs_on_failure)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def postgres():
    binary = label_studio_bin_or_skip()
    server = PostgresServer.find_or_start(str(Path(binary).with_name("python")))
    if server is None:
        reason = ("no PostgreSQL: none on 127.0.0.1:5432 and no server binaries to start one "
                  "(Debian: apt-get install postgresql)")
        if is_ci():
            pytest.fail("CI=true and " + reason, pytrace=False)
        pytest.skip(reason)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def label_studio_pg(postgres):
    env = postgres.create_database(f"ls_e2e_{secrets.token_hex(4)}")
    server = LabelStudioServer(label_studio_bin_or_skip(), extra_env=env)
    server.cache_dir = None  # the migrated-sqlite snapshot cache does not apply to PostgreSQL
    with server:
        yield server


def test_label_studio_on_postgres(label_studio_pg, images, start_backend):
    ls = label_studio_pg.client()
    project_id = ls.create_project("e2e on PostgreSQL", LABEL_CONFIG)
    names = ["landscape", "portrait"]
    task_ids = ls.import_images(project_id, [images[n] for n in names])
    task_sizes = {tid: IMAGE_SIZES[n] for tid, n in zip(task_ids, names)}
    backend = start_backend(LABEL_STUDIO_URL=label_studio_pg.url, LABEL_STUDIO_API_KEY=label_studio_pg.legacy_token)
    with logs_on_failure(label_studio_pg, backend):
        ml_id = connect(ls, project_id, backend, "grounded-sam on PostgreSQL LS")
        ls.retrieve_predictions(project_id)
        check_stored_predictions(ls, task_sizes, "retrieve (LS on PostgreSQL)")
        context = {"result": [{"id": "p1", "from_name": "prompt", "to_name": "image", "type": "textarea",
                               "value": {"text": ["cat"]}, "origin": "manual"}]}
        answer = ls.interactive_annotating(ml_id, task_ids[1], context)
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), str(answer)[:2000]
        width, height = task_sizes[task_ids[1]]
        check_result(answer["data"]["result"], width, height, {"cat"}, "interactive (LS on PostgreSQL)")
    # The data really lives in PostgreSQL: LS's own sqlite file was never created.
    assert not list(Path(label_studio_pg.data_dir).glob("*.sqlite3")), list(Path(label_studio_pg.data_dir).iterdir())
