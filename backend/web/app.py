"""HTTP layer: the Label Studio ML-backend protocol (wire-compatible with label-studio-ml 2.x).

Routes: ``GET /`` and ``/health``, ``POST /setup`` (stores the project's ``extra_params``),
``POST /predict``, ``GET /versions``, ``GET /projects/<id>/settings``, ``POST /webhook``,
``GET /metrics``, and the bulk routes ``POST /prelabel``, ``GET|DELETE /jobs/<id>``. Thin by design:
parse and validate, call the deployment's :class:`~backend.modes.base.Backend` (one object, built
once, whatever the mode), serialize. Every error is JSON with a message; nothing here touches torch.

Bounds enforced here: bodies up to 64 MB, JSON nested at most
:data:`~backend.jsonbounds.MAX_JSON_DEPTH` levels (checked before parsing), the per-request caps of
:mod:`backend.ls.tasks` (413/400). Who may call what: :mod:`backend.web.auth`.

May import modes, bulk (request and errors), queue (errors), ls and the foundation modules.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, NotFound

from backend.errors import EngineNotServed, ModelLoadError
from backend.jsonbounds import loads_bounded
from backend.bulk.request import PrelabelError, RunRequest
from backend.ls.client import LabelStudioApiError
from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.options import OptionsError, PredictOptions
from backend.ls.regions import empty_prediction
from backend.ls.tasks import RequestError, RequestTooLarge, asks_for_nothing, split_prompt
from backend.modes.base import Backend
from backend.modes.factory import build_backend
from backend.modes.projects import PROJECT_ID_LIMIT, apply_project, for_run, project_id
from backend.modes.retrieve import Retrieve
from backend.queue import keys
from backend.queue.errors import QueueError
from backend.settings import Settings
from backend.web.auth import BULK_NEEDS_AUTH, CREDENTIALS_NEEDED, Access, check_access
from backend.web.jsonbody import BoundedJSONProvider, json_object, json_value

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 2**20
MAX_EXTRA_PARAMS_CHARS = 65536  # extra_params as text (LS's connection form): far more than any options need


def _is_int(value) -> bool:
    """A JSON integer (JSON's true/false are bools, which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _error(status: int, message: str):
    return jsonify({"status": "error", "message": message}), status


def _run_answer(run_id: str, act: Callable[[str], Any]):
    """``act(run_id)`` (status or cancel) as JSON, or 404 for anything but a known run's id (never a
    store lookup of an odd key)."""
    if not keys.RUN_ID.fullmatch(run_id):
        raise NotFound(f"no bulk run {run_id[:64]!r}: run ids are 16 lowercase hex characters")
    status = act(run_id)
    if status is None:
        return _error(404, f"no bulk run {run_id!r}: runs are kept for a week after they end")
    return jsonify(status.to_json())


def extra_params_options(value: Any, backend: Backend) -> PredictOptions:
    """``/setup``'s ``extra_params`` → :class:`PredictOptions`. LS sends what the admin typed in the
    connection form: a JSON object, or that object as a JSON string (bounded, parsed with the depth
    bound); null, "" or {} mean no options. Raises OptionsError (400) saying what to fix."""
    if isinstance(value, str):
        if len(value) > MAX_EXTRA_PARAMS_CHARS:
            raise OptionsError(f"extra_params has {len(value)} characters; at most {MAX_EXTRA_PARAMS_CHARS}")
        try:
            value = loads_bounded(value) if value.strip() else None
        except ValueError as exc:
            raise OptionsError(f"extra_params is not valid JSON ({exc}); use e.g. {{\"box_threshold\": 0.35}}") \
                from None
    options = PredictOptions.from_json(value)
    backend.check_choice(options)  # an engine or model version this deployment cannot serve: 400
    if options.prompt is not None:
        try:
            split_prompt(options.prompt, backend.limits)
        except RequestError as exc:
            raise OptionsError(f"extra_params.prompt: {exc}") from None
    return options


def app_from_settings(settings: Settings) -> Flask:
    """The served app: the mode ``settings`` select, models preloaded unless PRELOAD_MODELS=false
    (gunicorn's ``_wsgi:app``, ``python _wsgi.py`` and ``python -m backend serve``)."""
    return create_app(settings, preload=settings.preload_models)


def create_app(settings: Settings | None = None, backend: Backend | None = None, preload: bool = False) -> Flask:
    """Build the app on ``backend`` (default: :func:`build_backend` from ``settings``, i.e. the mode
    ``REDIS_URL`` selects). ``preload`` starts loading the models in the background when this
    process runs them."""
    settings = settings or Settings.from_env()
    backend = backend or build_backend(settings)
    if preload:
        backend.preload()
    app = Flask(__name__)
    app.json = BoundedJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    retrieve = Retrieve(settings, backend)  # "Retrieve predictions" within RETRIEVE_BUDGET
    app.json.sort_keys = False
    _register_errors(app)

    @app.before_request
    def _start_and_authenticate():
        g.started = time.perf_counter()
        access = check_access(settings, request)
        if access is Access.BULK_CLOSED:
            log.warning("403 on %r: bulk routes need basic auth", request.path[:100])
            return _error(403, BULK_NEEDS_AUTH)
        if access is Access.UNAUTHORIZED:
            response, status = _error(401, CREDENTIALS_NEEDED)
            response.headers["WWW-Authenticate"] = 'Basic realm="grounded-sam"'
            return response, status
        return None

    @app.after_request
    def _count(response: Response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        backend.metrics.http_requests.labels(route, str(response.status_code)).inc()
        backend.metrics.http_seconds.labels(route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.get("/")
    @app.get("/health")
    def health():
        state = backend.health()
        return jsonify(state), (503 if state.get("status") == "DOWN" else 200)

    @app.post("/setup")
    def setup():
        body = json_object(request)
        schema = body.get("schema") or body.get("label_config")
        if not isinstance(schema, str):
            raise RequestError("'schema' must be the project's label config (XML string)")
        parse_label_config(schema)  # loads no model: LS gives /setup 3 s
        # LS sends the connection's extra_params on every /setup: null means the admin set none,
        # so the project's options are replaced every time (its remembered prompt is kept).
        options = extra_params_options(body.get("extra_params"), backend)
        project = project_id(body.get("project"))
        if project is not None:
            backend.projects.set_options(project, options)
            log.info("setup: project %d, options %s", project, sorted(options.to_json()) or "none")
        # LS keeps this as the version whose predictions "Retrieve predictions" skips: the project's engine's
        return jsonify({"model_version": backend.engine_state(options).get("model_version") or backend.model_version})

    @app.post("/predict")
    def predict():
        body = json_object(request)
        project = project_id(body.get("project"))
        parsed = retrieve.parse(body, project)  # over MAX_TASKS_PER_REQUEST only where RETRIEVE_BUDGET applies
        if project is not None:  # the project's options; its default prompt for calls without context
            parsed = apply_project(backend.projects, project, parsed, backend.limits)
        started = time.perf_counter()
        if asks_for_nothing(parsed):  # LS 1.23 after Submit: {"result": []}; no image is fetched
            log.info("predict: %d tasks, interactive call with no prompt and no smart-tool regions: "
                     "empty predictions", len(parsed.tasks))
            predictions = [empty_prediction(backend.model_version) for _ in parsed.tasks]
        else:
            predictions = retrieve.predict(parsed, project, g.started)  # [] for tasks deferred to a bulk run
            log.info("predict: %d tasks, %d regions, %.2f s", len(parsed.tasks),
                     sum(len(p["result"]) for p in predictions if p), time.perf_counter() - started)
            if project is not None:  # the next tasks' embeddings, where the mode can
                backend.prewarm(project, parsed)
        return jsonify({"results": predictions, "model_version": backend.model_version})

    @app.post("/warm")
    def warm():
        body = json_object(request)
        project = project_id(body.get("project"))
        tasks, after = body.get("tasks", settings.prewarm_tasks or 3), body.get("after")
        if project is None or not _is_int(tasks) or (after is not None and not _is_int(after)):
            raise RequestError("POST /warm takes {\"project\": ID, \"tasks\"?: 1-100, \"after\"?: task id}")
        stored = backend.projects.get(project)
        try:
            answer = backend.warm(project, tasks, after, stored.options if stored else PredictOptions())
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        return jsonify({"project": project, **answer})

    @app.post("/prelabel")
    def prelabel():
        run = RunRequest.from_json(json_object(request))
        if not settings.has_label_studio_credentials:
            raise RequestError(Settings.LS_CREDENTIALS_NEEDED)
        run = for_run(backend.projects, run)  # the project's options, its default prompt when none is given
        status = backend.runs.start(run)
        log.info("prelabel run %s started for project %s", status.id, run.project)
        return jsonify(status.to_json()), 202

    @app.get("/jobs/<run_id>")
    def run_status(run_id: str):
        return _run_answer(run_id, backend.runs.status)

    @app.delete("/jobs/<run_id>")
    def cancel(run_id: str):
        return _run_answer(run_id, backend.runs.cancel)

    @app.get("/versions")
    def versions():
        # LS 1.23 (ml/api.py MLBackendVersionsAPI) reads "versions" to fill its model-version list
        return jsonify({"versions": backend.versions(), "model_version": backend.model_version,
                        "engines": backend.served()})

    @app.get("/projects/<int:project>/settings")
    def project_settings(project: int):
        stored = backend.projects.get(project) if 1 <= project < PROJECT_ID_LIMIT else None
        if stored is None:
            return _error(404, f"no settings stored for project {project}: Label Studio stores them with "
                               "/setup (when the model connection is saved or checked)")
        # which engine answers the project, and whether it is served right now
        return jsonify({**stored.to_json(project), "remember_prompt": backend.projects.remember,
                        **backend.engine_state(stored.options)})

    @app.post("/webhook")
    def webhook():
        body = json_value(request)
        action = body.get("action") if isinstance(body, dict) else None
        if not isinstance(action, str):
            raise RequestError("a webhook body is a JSON object with an 'action'")
        log.info("webhook %s acknowledged", action)
        return jsonify({"status": "ok", "action": action})

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(backend.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    return app


def _register_errors(app: Flask) -> None:
    """Every error is JSON ``{"status": "error", "message": ...}`` with the status that fits."""

    @app.errorhandler(RequestError)
    @app.errorhandler(LabelConfigError)
    @app.errorhandler(PrelabelError)
    @app.errorhandler(OptionsError)
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

    @app.errorhandler(ModelLoadError)
    def _models_not_loaded(exc: ModelLoadError):
        # Logged once with the fix where the load failed; per request only the status line.
        log.info("503 on %r: the models are not loaded", request.path[:100])
        return _error(503, f"the models are not loaded: {exc.reason}")

    @app.errorhandler(EngineNotServed)
    def _engine_not_served(exc: EngineNotServed):
        log.warning("503 on %r: %s", request.path[:100], exc.reason)
        return _error(503, exc.reason)

    @app.errorhandler(QueueError)
    def _queue_error(exc):
        log.warning("%d on %s: %s", exc.http_status, request.path, exc)
        return _error(exc.http_status, str(exc))
