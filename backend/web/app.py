"""HTTP layer: the Label Studio ML-backend protocol (wire-compatible with label-studio-ml 2.x).

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``GET /metrics``, and the bulk routes ``POST /prelabel``, ``GET|DELETE /jobs/<id>``. Thin by design:
parse and validate, call the model class, serialize. Every error is JSON with a message; nothing
here touches torch.

Bounds enforced here: bodies up to 64 MB, JSON nested at most :data:`MAX_JSON_DEPTH` levels (checked
before parsing, so hostile nesting is a 400, never a RecursionError), the per-request caps of
:mod:`backend.ls.tasks` (413/400). The bulk routes act in LS with the backend's own API key, so they
need basic auth, or ``ALLOW_UNAUTHENTICATED_BULK=true``; without either they answer 403.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from typing import Any

import numpy as np
from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, NotFound

from backend.queue.client import QueueClient, QueueError
from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.client import LabelStudioApiError
from backend.metrics import Metrics
from backend.pipeline.predict import Pipeline, model_version, prompt_limits
from backend.bulk.prelabel import PrelabelError
from backend.ls.regions import empty_prediction
from backend.bulk.runstore import MemoryRunStore, RedisRunStore
from backend.settings import Settings
from backend.bulk.supervisor import cancel_run, start_prelabel_in_background
from backend.ls.tasks import RequestError, RequestTooLarge, asks_for_nothing, parse_predict_request, plan_tasks
from model import GroundedSAM

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 100  # LS bodies nest ~10 levels (task → annotations → result → value → points)
UNAUTHENTICATED = {"/health", "/webhook"}
  # LS sends its auto-created webhook without credentials
BULK_ENDPOINTS = {"prelabel", "run_status", "cancel"}  # act in LS with the backend's own API key
RUN_ID = re.compile(r"[0-9a-f]{16}")  # runstore's ids: 16 lowercase hex characters

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal (linear time, no backtracking)
_DEPTH_CHUNK = 2**20


class JsonTooDeep(ValueError):
    """A JSON text nests deeper than :data:`MAX_JSON_DEPTH` (a ValueError, as json's own errors)."""


def json_depth(data: bytes) -> int:
    """How deep ``data``'s brackets nest, outside string literals, without parsing it.

    C speed (a regex and numpy) and no recursion, so hostile nesting ("[" * 10**6) costs no stack.
    Exact for valid JSON; for invalid JSON it is some number, and the parser rejects the text anyway.
    """
    codes = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    depth = peak = 0
    for start in range(0, len(codes), _DEPTH_CHUNK):  # chunks bound the int32 temporaries
        part = codes[start:start + _DEPTH_CHUNK]
        steps = ((part == ord("[")) | (part == ord("{"))).astype(np.int32) - ((part == ord("]")) | (part == ord("}")))
        running = np.cumsum(steps) + depth
        peak, depth = max(peak, int(running.max(initial=depth))), int(running[-1]) if len(running) else depth
    return peak


def loads_bounded(data: bytes | str) -> Any:
    """``json.loads`` that refuses nesting deeper than :data:`MAX_JSON_DEPTH` before parsing.

    Raises :class:`JsonTooDeep` or ``json.JSONDecodeError`` (both ValueErrors, with a message)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise JsonTooDeep(f"the JSON body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    return json.loads(raw)


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON with the depth bound, so any ``request.get_json`` is bounded too."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads_bounded(s)


def _error(status: int, message: str):
    return jsonify({"status": "error", "message": message}), status


def _json_value() -> Any:
    """The request's JSON body, parsed with the depth bound. Raises RequestError (400) saying why."""
    if not request.is_json:
        raise RequestError("the request body must be JSON (Content-Type: application/json)")
    try:
        return loads_bounded(request.get_data(cache=True))  # bounded by MAX_CONTENT_LENGTH
    except JsonTooDeep as exc:
        raise RequestError(str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: the message says where
        raise RequestError(f"the request body is not valid JSON ({exc})") from None


def _json_body() -> dict:
    body = _json_value()
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _check_run_id(run_id: str) -> None:
    """Anything but a run id is an unknown run (404), never a store lookup of an odd key."""
    if not RUN_ID.fullmatch(run_id):
        raise NotFound(f"no bulk run {run_id[:64]!r}: run ids are 16 lowercase hex characters")


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None, preload: bool = False) -> Flask:
    """Build the app.

    Embedded mode (no ``REDIS_URL``): predictions run in this process; ``preload`` starts loading
    the models in the background at once. Queue mode: /predict enqueues on RQ and waits for the
    workers; this process never imports torch nor loads a model.
    """
    settings = settings or Settings.from_env()
    queue = None
    if settings.redis_url:
        queue = QueueClient(settings.redis_url, settings.predict_timeout, chunk_size=settings.batch_size or 32)
        version, limits, metrics = model_version(settings), prompt_limits(settings), Metrics()
    else:
        pipeline = pipeline or Pipeline(settings)
        version, limits, metrics = pipeline.model_version, pipeline.limits, pipeline.metrics
        if preload:
            threading.Thread(target=pipeline.engine, name="preload-models", daemon=True).start()
    runs = RedisRunStore(queue.connection) if queue else MemoryRunStore()  # bulk runs of /prelabel
    app = Flask(__name__)
    app.json = BoundedJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False

    @app.before_request
    def _start_and_authenticate():
        g.started = time.perf_counter()
        if settings.basic_auth_user is None:
            if request.endpoint in BULK_ENDPOINTS and not settings.allow_unauthenticated_bulk:
                log.warning("403 on %r: bulk routes need basic auth", request.path[:100])
                return _error(403, "bulk routes (/prelabel, /jobs) act in Label Studio with the backend's API key: "
                                   "set BASIC_AUTH_USER and BASIC_AUTH_PASS on the backend (or, on a trusted "
                                   "network only, ALLOW_UNAUTHENTICATED_BULK=true)")
            return None
        if request.path in UNAUTHENTICATED:
            return None
        auth = request.authorization
        ok = (auth is not None and auth.type == "basic"
              and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
              and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode()))
        if ok:
            return None
        response, status = _error(401, "authentication required: use the backend's basic-auth user and password")
        response.headers["WWW-Authenticate"] = 'Basic realm="grounded-sam"'
        return response, status

    @app.after_request
    def _count(response: Response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.http_requests.labels(route, str(response.status_code)).inc()
        metrics.http_seconds.labels(route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(RequestError)
    @app.errorhandler(LabelConfigError)
    @app.errorhandler(PrelabelError)
    def _bad_request(exc):
        log.info("400 on %r: %s", request.path[:100], exc)
        return _error(400, str(exc))

    @app.errorhandler(RequestTooLarge)
    def _too_large(exc):
        log.info("413 on %r: %s", request.path[:100], exc)
        return _error(413, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s", request.path)
        return _error(500, f"internal error: {type(exc).__name__}; see the backend log")

    @app.errorhandler(LabelStudioApiError)
    def _label_studio_error(exc):
        log.warning("502 on %s: %s", request.path, exc)
        return _error(502, f"Label Studio: {exc}")

    @app.errorhandler(QueueError)
    def _queue_error(exc):
        log.warning("%d on %s: %s", exc.http_status, request.path, exc)
        return _error(exc.http_status, str(exc))

    @app.get("/")
    @app.get("/health")
    def health():
        body = {"status": "UP", "model_class": GroundedSAM.__name__, "model_version": version,
                "mode": "queue" if queue else "embedded"}
        if queue:
            body.update(queue.health())
        return jsonify(body)

    @app.post("/setup")
    def setup():
        body = _json_body()
        schema = body.get("schema") or body.get("label_config")
        if not isinstance(schema, str):
            raise RequestError("'schema' must be the project's label config (XML string)")
        parse_label_config(schema)  # loads no model: LS gives /setup 3 s
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict():
        body = _json_body()
        parsed = parse_predict_request(body, limits)
        started = time.perf_counter()
        if asks_for_nothing(parsed):  # LS 1.23 after Submit: {"result": []}; no image is fetched
            log.info("predict: %d tasks, interactive call with no prompt and no smart-tool regions: "
                     "empty predictions", len(parsed.tasks))
            return jsonify({"results": [empty_prediction(version) for _ in parsed.tasks], "model_version": version})
        if queue:
            plan_tasks(parsed, limits)  # a bad prompt is a 400 here, not a failed job
            predictions = queue.predict(parsed)
        else:
            model = GroundedSAM(body["label_config"], pipeline)
            predictions = model.predict(parsed.tasks, context=parsed.context)
        log.info("predict: %d tasks, %d regions, %.2f s", len(parsed.tasks),
                 sum(len(p["result"]) for p in predictions), time.perf_counter() - started)
        return jsonify({"results": predictions, "model_version": version})

    @app.post("/prelabel")
    def prelabel():
        body = _json_body()
        project, chunk = body.get("project"), body.get("chunk", 64)
        if not isinstance(project, int) or isinstance(project, bool) or project < 1:
            raise RequestError("'project' must be the Label Studio project id (a positive integer)")
        if not isinstance(chunk, int) or not 1 <= chunk <= 256:
            raise RequestError("'chunk' must be an integer in [1, 256] (tasks per job)")
        prompt, redo = body.get("prompt"), body.get("redo", False)
        if (prompt is not None and not isinstance(prompt, str)) or not isinstance(redo, bool):
            raise RequestError("'prompt' must be a string and 'redo' a boolean")
        wanted_version = body.get("model_version")
        if wanted_version is not None and (not isinstance(wanted_version, str) or not wanted_version.strip()):
            raise RequestError("'model_version' must be a non-empty string (default: the live workers' version)")
        if not settings.label_studio_url or not settings.label_studio_api_key:
            raise RequestError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend to pre-label projects")
        run_id = start_prelabel_in_background(
            settings, project, prompt=prompt, chunk=chunk, redo=redo, store=runs,
            connection=queue.connection if queue else None, pipeline=None if queue else pipeline,
            model_version=wanted_version)
        log.info("prelabel run %s started for project %s", run_id, project)
        return jsonify(runs.status(run_id).to_json()), 202

    @app.get("/jobs/<run_id>")
    def run_status(run_id: str):
        _check_run_id(run_id)
        status = runs.status(run_id)
        if status is None:
            return _error(404, f"no bulk run {run_id!r}: runs are kept for a week after they end")
        return jsonify(status.to_json())

    @app.delete("/jobs/<run_id>")
    def cancel(run_id: str):
        _check_run_id(run_id)
        if runs.status(run_id) is None:
            return _error(404, f"no bulk run {run_id!r}")
        cancel_run(runs, run_id, queue.connection if queue else None)
        return jsonify(runs.status(run_id).to_json())

    @app.post("/webhook")
    def webhook():
        body = _json_value()
        action = body.get("action") if isinstance(body, dict) else None
        if not isinstance(action, str):
            raise RequestError("a webhook body is a JSON object with an 'action'")
        log.info("webhook %s acknowledged", action)
        return jsonify({"status": "ok", "action": action})

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    return app
