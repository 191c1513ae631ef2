"""Label Studio API credentials: legacy tokens and personal access tokens (PATs).

Label Studio (1.23.2, recorded in ``shared/ls-protocol/image_auth_matrix.json``) accepts two kinds
of ``LABEL_STUDIO_API_KEY``:

* a *legacy token* (40 hex characters): sent as ``Authorization: Token <key>``;
* a *personal access token*: a JWT *refresh* token (payload ``token_type == "refresh"`` with an
  ``exp``). LS refuses it in any header; it must first be exchanged at
  ``POST {base_url}/api/token/refresh/`` with ``{"refresh": key}`` for ``{"access": "<jwt>"}``,
  and the short-lived access token is sent as ``Authorization: Bearer <access>``.

:class:`LabelStudioAuth` hides the difference behind :meth:`LabelStudioAuth.headers`. Tokens never
appear in its ``repr``, in log lines, or in error reasons.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import requests

from backend.errors import ReasonError

log = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh/"
#: Refresh the access token this many seconds before its ``exp`` (at most half its lifetime).
DEFAULT_REFRESH_MARGIN_S = 30.0
#: Lifetime assumed for an access token whose ``exp`` cannot be read.
FALLBACK_ACCESS_LIFETIME_S = 60.0


class LabelStudioAuthError(ReasonError):
    """Credentials could not be turned into a working header (``reason`` never contains a token)."""


def _b64url_json(segment: str) -> Any:
    """Decode one base64url JWT segment (padding optional) as JSON; ``None`` if it is not one."""
    if not segment or any(c not in _B64URL_CHARS for c in segment):
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def jwt_payload(token: str) -> dict[str, Any] | None:
    """The payload of a JWT-shaped string (three base64url segments), without checking the signature.

    Returns ``None`` when ``token`` is not JWT-shaped or the payload is not a JSON object.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[2] or any(c not in _B64URL_CHARS for c in parts[2]):
        return None
    if not isinstance(_b64url_json(parts[0]), dict):
        return None
    payload = _b64url_json(parts[1])
    return payload if isinstance(payload, dict) else None


def _exp_of(payload: dict[str, Any] | None) -> float | None:
    exp = payload.get("exp") if payload else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


def is_personal_access_token(key: str) -> bool:
    """True when ``key`` is an LS personal access token (a JWT refresh token with an ``exp``)."""
    payload = jwt_payload(key)
    return bool(payload) and payload.get("token_type") == "refresh" and _exp_of(payload) is not None


class AuthKind(str, Enum):
    """Which credentials a :class:`LabelStudioAuth` holds (a ``str`` enum: equal to its value)."""

    NONE = "none"  # no key: no header is sent
    LEGACY = "legacy"  # a legacy token: ``Authorization: Token ...``
    PAT = "pat"  # a personal access token, exchanged for Bearer access tokens


class LabelStudioAuth:
    """Authorization headers for requests to one Label Studio instance.

    ``api_key`` may be ``None`` (no header is sent), a legacy token, or a personal access token.
    For a PAT the access token is obtained lazily on the first :meth:`headers` call, reused, and
    refreshed ``refresh_margin`` seconds (at most half its lifetime) before its ``exp``. All of this
    is guarded by a lock, so one instance can be shared by many threads; concurrent callers that
    find the token stale wait for a single refresh instead of each doing their own.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float = 10.0,
        *,
        session: requests.Session | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "LABEL_STUDIO_URL must be an absolute http(s) URL such as http://localhost:8080"
            )
        if not timeout or timeout <= 0:
            raise ValueError("the Label Studio API timeout must be a positive number of seconds")
        key = (api_key or "").strip()
        self._base_url = base_url.rstrip("/")
        self._key = key or None
        self._timeout = float(timeout)
        self._session = session
        self._refresh_margin = float(refresh_margin)
        self._clock = clock
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_refresh_at = 0.0
        if self._key is None:
            self._kind = AuthKind.NONE
        elif is_personal_access_token(self._key):
            self._kind = AuthKind.PAT
        else:
            self._kind = AuthKind.LEGACY

    # -- public -----------------------------------------------------------------------------------

    @property
    def kind(self) -> AuthKind:
        """Which credentials this instance holds (fixed at construction)."""
        return self._kind

    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header to send to LS (empty dict when no key is configured).

        Raises :class:`LabelStudioAuthError` when a PAT cannot be exchanged for an access token.
        """
        if self._kind is AuthKind.NONE:
            return {}
        if self._kind is AuthKind.LEGACY:
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or self._clock() >= self._access_refresh_at:
                self._refresh_locked()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        """Forget the current access token, e.g. after LS answered 401 (clock skew, revocation).

        The next :meth:`headers` call obtains a new one. No effect for legacy tokens.
        """
        with self._lock:
            self._access = None
            self._access_refresh_at = 0.0

    def __repr__(self) -> str:
        return f"LabelStudioAuth(base_url={self._base_url!r}, kind={self._kind.value!r})"

    __str__ = __repr__

    # -- internals --------------------------------------------------------------------------------

    def _refresh_locked(self) -> None:
        key = self._key or ""
        pat_exp = _exp_of(jwt_payload(key))
        now = self._clock()
        if pat_exp is not None and pat_exp <= now:
            raise LabelStudioAuthError(
                "LABEL_STUDIO_API_KEY is an expired Label Studio personal access token: "
                "create a new one in Label Studio (Account & Settings > Personal Access Token)"
            )
        url = self._base_url + REFRESH_PATH
        post = self._session.post if self._session is not None else requests.post
        try:
            resp = post(
                url,
                json={"refresh": key},
                timeout=self._timeout,
                allow_redirects=False,
                headers={"Accept": "application/json"},
            )
        except requests.RequestException as exc:
            log.warning("LS token refresh failed: %s", type(exc).__name__)
            raise LabelStudioAuthError(
                f"could not reach Label Studio at {self._base_url}{REFRESH_PATH} to exchange the "
                f"personal access token ({type(exc).__name__}): check LABEL_STUDIO_URL"
            ) from None
        with resp:
            status = resp.status_code
            if status != 200:
                log.warning("LS token refresh answered HTTP %d", status)
                hint = (
                    "check that LABEL_STUDIO_API_KEY is a valid, unrevoked personal access token"
                    if status in (400, 401, 403)
                    else "check LABEL_STUDIO_URL and that Label Studio is healthy"
                )
                raise LabelStudioAuthError(
                    f"Label Studio refused the personal access token exchange at {REFRESH_PATH} "
                    f"(HTTP {status}): {hint}"
                )
            try:
                body = resp.json()
            except ValueError:
                body = None
        access = body.get("access") if isinstance(body, dict) else None
        if not isinstance(access, str) or not access.strip():
            log.warning("LS token refresh answered without an access token")
            raise LabelStudioAuthError(
                f"Label Studio answered {REFRESH_PATH} without an 'access' token: check that "
                "LABEL_STUDIO_URL points at Label Studio (not a proxy page)"
            )
        access = access.strip()
        now = self._clock()
        exp = _exp_of(jwt_payload(access))
        if exp is None:
            exp = now + FALLBACK_ACCESS_LIFETIME_S
        margin = min(self._refresh_margin, max(0.0, (exp - now) / 2.0))
        self._access = access
        self._access_refresh_at = exp - margin
        log.info("obtained a Label Studio access token (valid for %.0f s)", max(0.0, exp - now))
