"""A Label Studio API answer that is not LS's JSON (issue 20): ``LabelStudioApi`` raises
``LabelStudioApiError`` with a one-line reason (never the SDK's UnicodeDecodeError, never the body),
and pre-warming logs that reason in one line, without a traceback, and goes on.

``tests/imageserver.py`` plays the LS API here and answers a PNG (or an HTML page) where the SDK
expects JSON; the real LS calls are tested in tests/test_dm_order.py and tests/test_prelabel.py."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest

from backend.ls.client import LabelStudioApi, LabelStudioApiError
from tests.imageserver import ImageServer
from tests.test_protocol import png

TOKEN = "test-legacy-token-42"
#: every LS endpoint pre-warming and bulk runs read
LS_PATHS = ("/api/projects/7/", "/api/dm/views/", "/api/dm/columns", "/api/tasks/", "/api/predictions/")
CALLS = {
    "label config": lambda api: api.label_config(7),
    "next tasks": lambda api: api.next_tasks(7, 1, 2),
    "tasks": lambda api: list(api.iter_tasks(7)),
    "Data Manager columns": lambda api: api._hidden_columns(7),
    "predictions": lambda api: api.predictions(3),
}
ANSWERS = {"png": (png(40, 30), "image/png"), "html": (b"<html><body>sign in</body></html>", "text/html")}


@pytest.fixture
def not_ls():
    """An 'LS' whose API answers ``server.answer`` (body, content type) on every endpoint."""
    server = ImageServer(legacy_token=TOKEN, pat="unused").start()
    server.answer = ANSWERS["png"]

    def serve(handler, query):
        handler.send_bytes(200, *server.answer)

    for path in LS_PATHS:
        server.route("GET", path, serve)
    yield server
    server.stop()


@pytest.mark.parametrize("answer", sorted(ANSWERS))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_an_answer_that_is_not_json_is_a_label_studio_api_error(not_ls, call, answer, caplog):
    not_ls.answer = ANSWERS[answer]
    with LabelStudioApi(not_ls.base, TOKEN, max_retries=0) as api, pytest.raises(LabelStudioApiError) as raised:
        CALLS[call](api)
    reason = raised.value.reason
    content_type = ANSWERS[answer][1]
    assert f"is not Label Studio's JSON ({content_type}" in reason and "LABEL_STUDIO_URL" in reason, reason
    assert "\n" not in reason and "sign in" not in reason and "PNG" not in reason and "\ufffd" not in reason, reason
    assert "Traceback" not in caplog.text


def test_a_task_page_that_is_not_json_after_good_answers(not_ls):
    not_ls.route("GET", "/api/dm/columns", lambda handler, query: handler.send_json(200, {"columns": []}))
    not_ls.route("GET", "/api/dm/views/", lambda handler, query: handler.send_json(200, []))
    with LabelStudioApi(not_ls.base, TOKEN, max_retries=0) as api:
        for read in (lambda: list(api.iter_tasks(7)), lambda: api.next_tasks(7, None, 2)):
            with pytest.raises(LabelStudioApiError, match=r"could not list tasks of project 7: .* \(image/png"):
                read()
    assert any(r.path.startswith("/api/tasks/") for r in not_ls.requests)


def test_prewarming_logs_a_bad_ls_answer_in_one_line_and_goes_on(not_ls, tiny_settings, caplog):
    from backend.ls.labelconfig import parse_label_config
    from backend.pipeline.predict import Pipeline
    from backend.pipeline.prewarm import Prewarmer, WarmRequest
    from tests.test_refine import CONFIG

    settings = replace(tiny_settings, label_studio_url=not_ls.base, label_studio_api_key=TOKEN)
    prewarmer = Prewarmer(Pipeline(settings))
    caplog.set_level(logging.INFO)

    def failures(count: int) -> list[logging.LogRecord]:
        deadline = time.monotonic() + 60
        while True:
            found = [r for r in caplog.records if r.getMessage().startswith("pre-warming project 7 failed")]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    prewarmer.submit(WarmRequest(project=7, after=1, count=2))  # reads the label config first
    assert len(failures(1)) == 1, caplog.text[-3000:]
    prewarmer.submit(WarmRequest(project=7, after=1, count=2, config=parse_label_config(CONFIG)))  # the tasks
    found = failures(2)
    assert len(found) == 2, caplog.text[-3000:]
    assert "could not read project 7" in found[0].getMessage()
    assert "could not list the Data Manager tabs of project 7" in found[1].getMessage()
    for record in found:
        assert record.levelno == logging.WARNING and record.exc_info is None, record.getMessage()
        assert "is not Label Studio's JSON (image/png" in record.getMessage()
    assert "Traceback" not in caplog.text and "UnicodeDecodeError:" not in caplog.text, caplog.text[-3000:]
    assert prewarmer._thread.is_alive()  # the background thread goes on
