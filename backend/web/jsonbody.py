"""JSON request bodies, parsed with the nesting bound of :mod:`backend.jsonbounds`: hostile nesting
is a 400 with a message, never a RecursionError."""

from __future__ import annotations

from typing import Any

from flask import Request
from flask.json.provider import DefaultJSONProvider

from backend.jsonbounds import JsonTooDeep, loads_bounded
from backend.ls.tasks import RequestError


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON with the depth bound, so any ``request.get_json`` is bounded too."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads_bounded(s)


def json_value(request: Request) -> Any:
    """The request's JSON body, parsed with the depth bound. Raises RequestError (400) saying why."""
    if not request.is_json:
        raise RequestError("the request body must be JSON (Content-Type: application/json)")
    try:
        return loads_bounded(request.get_data(cache=True))  # bounded by MAX_CONTENT_LENGTH
    except JsonTooDeep as exc:
        raise RequestError(str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: the message says where
        raise RequestError(f"the request body is not valid JSON ({exc})") from None


def json_object(request: Request) -> dict:
    """:func:`json_value`, which must be a JSON object."""
    body = json_value(request)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body
