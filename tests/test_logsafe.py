"""Log lines never carry user-controlled line breaks: a caller cannot forge log lines."""

import io
import logging

import requests

from backend.logsetup import SingleLineFilter, configure_logging, escape_control
from tests.test_http import CONFIG

FORGED = "INJECTED ERROR admin password changed"


def test_escape_control_writes_every_line_break_as_an_escape():
    assert escape_control("a\nb\r\nc\x00d\x1be\u2028f\x85g\th") == "a\\nb\\r\\nc\\x00d\\x1be\\u2028f\\x85g\th"
    assert escape_control("plain text, ünïcode") == "plain text, ünïcode"


def test_filter_escapes_arguments_but_keeps_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SingleLineFilter())
    logger = logging.getLogger("test_logsafe.unit")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("task %s: empty prediction: %s", "7\n" + FORGED, "bad\rurl")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed on %s", "x\ny")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"task 7\\n{FORGED}: empty prediction: bad\\rurl"
    assert lines[1] == "failed on x\\ny"
    assert lines[2] == "Traceback (most recent call last):"  # exc_info stays readable
    assert not any(line.startswith(FORGED) for line in lines)


def test_configure_logging_is_idempotent():
    configure_logging("INFO")
    configure_logging("WARNING")
    root = logging.getLogger()
    try:
        assert root.level == logging.WARNING
        for handler in root.handlers:
            assert sum(isinstance(f, SingleLineFilter) for f in handler.filters) == 1
    finally:
        root.setLevel(logging.INFO)


def test_a_served_request_cannot_forge_log_lines(start_backend):
    """Through the real server: the task id and the image URL a caller sends end up in log lines."""
    backend = start_backend()
    tasks = [{"id": "1\n" + FORGED, "data": {}},
             {"id": 2, "data": {"image": "http://\r\n" + FORGED + "/x.png"}}]
    response = requests.post(f"{backend.url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=60)
    assert response.status_code == 200
    assert len(response.json()["results"]) == 2
    log_lines = backend.log_text().splitlines()
    assert any("\\n" + FORGED in line for line in log_lines)  # it was logged, escaped
    assert not any(line.startswith(FORGED) for line in log_lines)
