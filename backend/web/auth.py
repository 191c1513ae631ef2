"""Who may call which route: basic auth, the routes LS calls without credentials, and the bulk
routes that stay closed without basic auth (they act in LS with the backend's own API key)."""

from __future__ import annotations

import enum
import hmac

from flask import Request

from backend.settings import Settings

#: LS sends /health checks and its auto-created webhook without credentials.
UNAUTHENTICATED_PATHS = frozenset({"/health", "/webhook"})
#: Flask endpoints that act in LS with the backend's own API key.
BULK_ENDPOINTS = frozenset({"prelabel", "run_status", "cancel", "warm"})

BULK_NEEDS_AUTH = ("bulk routes (/prelabel, /jobs, /warm) act in Label Studio with the backend's API key: set "
                   "BASIC_AUTH_USER and BASIC_AUTH_PASS on the backend (or, on a trusted network only, "
                   "ALLOW_UNAUTHENTICATED_BULK=true)")
CREDENTIALS_NEEDED = "authentication required: use the backend's basic-auth user and password"


class Access(enum.Enum):
    """The decision for one request."""

    ALLOWED = "allowed"
    BULK_CLOSED = "bulk-closed"  # 403: no basic auth configured, bulk routes not opened explicitly
    UNAUTHORIZED = "unauthorized"  # 401: basic auth configured, credentials missing or wrong


def check_access(settings: Settings, request: Request) -> Access:
    """Decide whether ``request`` may run (compares credentials in constant time)."""
    if settings.basic_auth_user is None:
        if request.endpoint in BULK_ENDPOINTS and not settings.allow_unauthenticated_bulk:
            return Access.BULK_CLOSED
        return Access.ALLOWED
    if request.path in UNAUTHENTICATED_PATHS:
        return Access.ALLOWED
    auth = request.authorization
    ok = (auth is not None and auth.type == "basic"
          and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
          and hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode()))
    return Access.ALLOWED if ok else Access.UNAUTHORIZED
