"""A small threaded HTTP server on 127.0.0.1 that plays Label Studio and hostile image hosts.

It records every request (method, path with query, headers) so tests can assert what was sent, or
that nothing was. Routes are plain callables ``route(handler, query) -> None`` keyed by path; tests
add their own with :meth:`ImageServer.route`.

LS behaviour mirrors ``shared/ls-protocol/image_auth_matrix.json``: ``/data/...`` needs
``Authorization: Token <legacy>`` or ``Bearer <access>`` where the access token came from
``POST /api/token/refresh/ {"refresh": <PAT>}``; the PAT itself is refused in any header.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(payload: dict) -> str:
    """A JWT-shaped string (``header.payload.signature``, base64url) with a fake signature."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(payload).encode())
    return f"{header}.{body}.{_b64url(b'not-a-real-signature')}"


def jwt_exp(token: str) -> float:
    segment = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))["exp"]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # path with query, as sent
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == "authorization":
                return value
        return None


Route = Callable[["_Handler", dict[str, list[str]]], None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # bodies without Content-Length end at connection close

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _dispatch(self) -> None:
        owner = self.server.owner
        owner._record(Recorded(self.command, self.path, dict(self.headers.items())))
        parts = urlsplit(self.path)
        route = owner.routes.get((self.command, parts.path))
        try:
            if route is None:
                self.send_bytes(404, b"not found", "text/plain")
            else:
                route(self, parse_qs(parts.query, keep_blank_values=True))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts, size limits): expected in these tests

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    # helpers for routes
    def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/octet-stream",
        *,
        length: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: object) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_bytes(status, b"", "text/plain", headers={"Location": location})

    def read_json(self) -> object:
        size = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(size) or b"null")
        except ValueError:
            return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: ImageServer


class ImageServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``base`` is ``http://127.0.0.1:PORT``.

    ``host`` is the loopback address to listen on (``127.0.0.2`` plays "another host");
    ``ssl_context`` makes it an https server, and ``sni`` records the server names clients sent.
    """

    def __init__(
        self,
        legacy_token: str,
        pat: str,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.legacy_token = legacy_token
        self.pat = pat
        self.routes: dict[tuple[str, str], Route] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self.refresh_calls = 0
        self.issued_access: list[str] = []
        #: lifetimes (seconds from now) of the next access tokens issued; default 300 s when empty
        self.access_ttls: list[float] = []
        self.host = host
        self.scheme = "https" if ssl_context is not None else "http"
        self.sni: list[str | None] = []
        self._server = _Server((host, 0), _Handler)
        self._server.owner = self
        if ssl_context is not None:
            ssl_context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.base = f"{self.scheme}://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.route("POST", "/api/token/refresh/", self._refresh)

    # lifecycle
    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self.refresh_calls = 0
            self.issued_access.clear()
            self.access_ttls.clear()
            self.sni.clear()

    # routing
    def route(self, method: str, path: str, fn: Route) -> None:
        self.routes[(method, path)] = fn

    def static(self, path: str, body: bytes, content_type: str = "image/png") -> None:
        self.route("GET", path, lambda h, q: h.send_bytes(200, body, content_type))

    def ls_static(self, path: str, body: bytes, content_type: str = "image/png") -> None:
        """Like :meth:`static`, but answers 401 unless the request carries valid LS credentials."""

        def serve(handler: _Handler, query: dict[str, list[str]]) -> None:
            if not self.authorized(handler):
                handler.send_json(401, {"detail": "Authentication credentials were not provided."})
            else:
                handler.send_bytes(200, body, content_type)

        self.route("GET", path, serve)

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    # records
    def _record(self, recorded: Recorded) -> None:
        with self._lock:
            self._requests.append(recorded)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    # LS auth
    def authorized(self, handler: _Handler) -> bool:
        header = handler.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme == "Token":
            return value == self.legacy_token
        if scheme == "Bearer":
            with self._lock:
                known = value in self.issued_access
            return known and jwt_exp(value) > time.time()
        return False

    def _refresh(self, handler: _Handler, query: dict[str, list[str]]) -> None:
        body = handler.read_json()
        refresh = body.get("refresh") if isinstance(body, dict) else None
        if refresh != self.pat or jwt_exp(self.pat) <= time.time():
            handler.send_json(
                401, {"detail": "Token is invalid or expired", "code": "token_not_valid"}
            )
            return
        with self._lock:
            self.refresh_calls += 1
            ttl = self.access_ttls.pop(0) if self.access_ttls else 300.0
            access = make_jwt(
                {
                    "token_type": "access",
                    "exp": int(time.time() + ttl),
                    "iat": int(time.time()),
                    "jti": f"access-{self.refresh_calls}",
                    "user_id": 1,
                }
            )
            self.issued_access.append(access)
        handler.send_json(200, {"access": access})
