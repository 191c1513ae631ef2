"""The interactive job function a worker runs: one chunk of an LS /predict request.

The payload is what :func:`backend.queue.client.predict_payload` builds from the web process's parsed
request: ``{"label_config": xml, "context": dict | None, "prompt": str | None, "tasks": [{"id", "data"}]}``
and, when the project has any, ``"options"`` (:meth:`backend.ls.options.PredictOptions.to_json`).
It is parsed again here (the worker trusts nothing it reads from Redis) with the same parser the web
process used. The bulk chunk job lives with the bulk package (:mod:`backend.bulk.chunkjob`).

Imports ls (the request parser) and the resident pipeline's accessor; never torch directly, never bulk.
"""

from __future__ import annotations

from dataclasses import replace

from backend.ls.options import OptionsError, PredictOptions
from backend.ls.tasks import RequestError, parse_predict_request
from backend.queue.resident import resident_pipeline


def predict_job(payload: dict) -> list[dict]:
    """One chunk of a /predict request (already validated by the web process) → one prediction per task."""
    pipeline = resident_pipeline()
    request = parse_predict_request(payload, pipeline.limits)
    prompt = payload.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string")
        request = replace(request, prompt=prompt)  # parse_predict_request reads LS bodies, which carry none
    if payload.get("options") is not None:
        try:
            request = replace(request, options=PredictOptions.from_json(payload["options"]))
        except OptionsError as exc:
            raise RequestError(f"the job's options: {exc}") from None
    return pipeline.predict(request)


__all__ = ["predict_job"]
