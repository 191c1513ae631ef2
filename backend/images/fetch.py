"""Resolve and download the image of a Label Studio task, then decode it.

:class:`ImageLoader` turns a task's image value into a :class:`LoadedImage`: it resolves the URL,
downloads the bytes within the limits of :class:`FetchSettings`, and hands them to
:func:`backend.images.decode.decode_image`. Every image returned is the *EXIF-transposed* image,
converted to RGB (see :mod:`backend.images.decode` for the frame and the decoding decisions).

Supported task URLs (``ImageLoader.load``):

* ``/data/upload/...``, ``/data/local-files/?d=...`` and any other path starting with ``/``: relative
  to ``LABEL_STUDIO_URL`` (an error if it is not configured), fetched with the LS credentials
  (legacy ``Token`` or a personal access token exchanged for a ``Bearer`` JWT, see
  :mod:`backend.ls.auth`). With ``local_files_root`` (LS's ``LOCAL_FILES_DOCUMENT_ROOT``) a
  local-files image that exists under that root is read from disk instead.
* absolute ``http://`` / ``https://`` URLs. Only URLs on the LS origin (same scheme, host and port as
  ``LABEL_STUDIO_URL``) get the LS credentials, and only until a redirect leaves that origin (for
  the rest of the chain, even if it comes back). Any other host must resolve to public addresses
  only (SSRF guard, :mod:`backend.images.urlguard`) unless ``allow_private_urls``.
* ``data:image/<type>;base64,<payload>`` URIs.

Every hop of a download (the URL and each redirect's ``Location``) is parsed once with
:func:`backend.images.safefetch.parse_target` (URLs that parsers read differently, such as user info,
backslashes or odd numeric IPv4 forms, are refused), its host is resolved once with the injectable
``resolver``, the addresses are checked, and the request goes to a checked address with ``Host``,
SNI and certificate verification on the name (:class:`backend.images.safefetch.PinnedHTTP`); LS-origin
URLs take the same pinned path, without the public-address check.

Every failure is an :class:`ImageError` whose ``reason`` says what went wrong and what to fix; it is
single-line, safe to log and to return to a client (no tokens, no query strings, no response
bodies; control characters from URLs and paths escaped).

Environment proxies (``HTTP(S)_PROXY``) are *not* used for images, nor for LS token refreshes: a
proxy would resolve the host itself, defeating the check above. CA certificates: ``ca_bundle``, else
``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / ``CURL_CA_BUNDLE``, else certifi. ``~/.netrc``
credentials and cookies are never used, so nothing but the LS ``Authorization`` header is ever
sent, and only to the LS origin.

:class:`ImageError`, :func:`check_public_host`, :func:`decode_image`, :func:`to_rgb` and
:data:`ALLOWED_FORMATS` are re-exported from :mod:`backend.images.decode` and :mod:`backend.images.urlguard`,
so ``from backend.images.fetch import ...`` keeps working for them.
"""

from __future__ import annotations

import base64
import binascii
import http.cookiejar
import logging
import math
import os
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import requests
import urllib3

from backend.images.decode import ALLOWED_FORMATS, ImageError, LoadedImage, PixelBudget, decode_image, to_rgb
from backend.ls.auth import LabelStudioAuth, LabelStudioAuthError
from backend.images.safefetch import PinnedHTTP, Target, ca_bundle_from_env, escape, parse_target
from backend.images.urlguard import (
    IPAddress,
    Resolver,
    check_public_host,
    refuse_localhost_name,
    require_public,
    resolve_host,
)

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_REDIRECTS",
    "FetchSettings",
    "ImageError",
    "ImageLoader",
    "LoadedImage",
    "check_public_host",
    "decode_image",
    "to_rgb",
]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_USER_AGENT = "grounded-sam-ml-backend/1 (image fetch)"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_LOCAL_FILES_PATH = "/data/local-files"


@dataclass(frozen=True)
class FetchSettings:
    """How images are fetched. Built once from the environment (``backend.settings``).

    ``ca_bundle`` is a CA file or directory for https image hosts; ``None`` means
    ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / ``CURL_CA_BUNDLE`` when set, else certifi's bundle.

    ``decode_budget_pixels`` is the capacity of the loader's :class:`~backend.images.decode.PixelBudget`:
    how many pixels its loads may decode at once (``DECODE_BUDGET_MP``).

    ``total_timeout`` bounds one whole :meth:`ImageLoader.load` call (all redirects and the body);
    ``None`` means ``connect_timeout + read_timeout``. It is checked before each request and between
    socket reads of the body, so a call may overrun it by at most one ``read_timeout``. Known gap: a
    server that drips the *response headers* is bounded only by ``read_timeout`` per socket read
    (requests gives no hook before the headers are parsed).
    """

    label_studio_url: str | None
    api_key: str | None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_download_bytes: int = 50 * 2**20
    max_image_pixels: int = 100_000_000
    decode_budget_pixels: int = 100_000_000
    allow_private_urls: bool = False
    local_files_root: str | None = None
    total_timeout: float | None = None
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        if self.label_studio_url is not None:
            try:
                parse_target(self.label_studio_url)
            except (ImageError, TypeError) as exc:
                reason = exc.reason if isinstance(exc, ImageError) else "not a string"
                raise ValueError(
                    "LABEL_STUDIO_URL must be an absolute http(s) URL such as "
                    f"http://localhost:8080, got {_describe(self.label_studio_url)} ({reason})"
                ) from None
        for name in ("connect_timeout", "read_timeout"):
            _require_positive(name, getattr(self, name))
        if self.total_timeout is not None:
            _require_positive("total_timeout", self.total_timeout)
        for name in ("max_download_bytes", "max_image_pixels", "decode_budget_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.local_files_root is not None and (
            not isinstance(self.local_files_root, str) or not self.local_files_root.strip()
        ):
            raise ValueError(
                "local_files_root (LOCAL_FILES_DOCUMENT_ROOT) must be a directory path or None, "
                f"got {self.local_files_root!r}"
            )

    @property
    def deadline_s(self) -> float:
        """Seconds one :meth:`ImageLoader.load` may take (see ``total_timeout``)."""
        if self.total_timeout is not None:
            return self.total_timeout
        return self.connect_timeout + self.read_timeout


def _require_positive(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


# --------------------------------------------------------------------------------------------------
# URL helpers


def _describe(url: str) -> str:
    """A log-safe, single-line short form of ``url``: no userinfo, no query (except local-files'
    ``d``), control characters escaped."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    if url[:5].lower() == "data:":
        return f"data: URI ({len(url)} characters)"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    if parts.path.rstrip("/").endswith(_LOCAL_FILES_PATH):
        d = parse_qs(parts.query, keep_blank_values=True).get("d")
        if d:
            text += "?d=" + d[0]
    return escape(text)


def _local_files_param(url: str) -> str | None:
    """The validated ``d`` of a ``/data/local-files/?d=...`` URL, or ``None`` for other URLs."""
    parts = urlsplit(url)
    if not parts.path.rstrip("/").endswith(_LOCAL_FILES_PATH):
        return None
    values = parse_qs(parts.query, keep_blank_values=True).get("d", [])
    if len(values) != 1 or not values[0]:
        raise ImageError(
            "a /data/local-files/ URL needs exactly one non-empty d= parameter "
            "(the file path relative to LOCAL_FILES_DOCUMENT_ROOT)"
        )
    d = values[0]
    problem = None
    if "\x00" in d:
        problem = "contains a NUL character"
    elif "\\" in d:
        problem = "contains a backslash"
    elif d.startswith("/") or (len(d) >= 2 and d[1] == ":"):
        problem = "is an absolute path"
    elif ".." in d.split("/"):
        problem = "contains a '..' segment"
    if problem is not None:
        raise ImageError(
            f"refusing local-files path {d[:200]!r}: it {problem}; "
            "d= must be a path relative to LOCAL_FILES_DOCUMENT_ROOT"
        )
    return d


def _new_session(ca_bundle: str) -> requests.Session:
    """The session LabelStudioAuth refreshes PATs with (LS origin only, never image hosts)."""
    session = requests.Session()
    # Direct connections like the image downloads (no env proxies, same CA bundle).
    session.trust_env = False
    session.verify = ca_bundle
    # A no-op auth stops requests from adding ~/.netrc credentials; refusing all cookies keeps one
    # host's cookies from being replayed to it (or LS's session cookie from being stored at all).
    session.auth = lambda request: request
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers["User-Agent"] = _USER_AGENT
    session.headers["Accept"] = "image/*,*/*;q=0.5"
    return session


# --------------------------------------------------------------------------------------------------
# loader


class ImageLoader:
    """Load task images (see the module docstring). Safe to share between threads.

    ``auth`` defaults to a :class:`~backend.ls.auth.LabelStudioAuth` built from the settings; pass one
    to share it with other LS API users. ``session`` is only the ``requests.Session`` that default
    ``auth`` refreshes PATs with (images are fetched by :class:`~backend.images.safefetch.PinnedHTTP`).
    ``resolver`` (``socket.getaddrinfo``'s signature, default ``socket.getaddrinfo``) is called
    exactly once per download hop for host names.

    ``budget`` bounds the pixels all loads of this loader decode at once; by default a new
    :class:`~backend.images.decode.PixelBudget` of ``settings.decode_budget_pixels``. A process has
    one loader (its pipeline's), so this is the per-process decoding bound.
    """

    def __init__(
        self,
        settings: FetchSettings,
        *,
        auth: LabelStudioAuth | None = None,
        session: requests.Session | None = None,
        resolver: Resolver | None = None,
        budget: PixelBudget | None = None,
    ) -> None:
        self._settings = settings
        self.budget = budget if budget is not None else PixelBudget(settings.decode_budget_pixels)
        ca_bundle = settings.ca_bundle or ca_bundle_from_env()
        self._http = PinnedHTTP(ca_bundle)
        self._resolver = resolver
        self._session = session if session is not None else _new_session(ca_bundle)
        self._ls_base: str | None = None
        self._ls_origin: tuple[str, str, int] | None = None
        self._auth: LabelStudioAuth | None = None
        if settings.label_studio_url:
            self._ls_base = settings.label_studio_url.rstrip("/")
            self._ls_origin = parse_target(self._ls_base).origin
            self._auth = auth or LabelStudioAuth(
                self._ls_base,
                settings.api_key,
                timeout=settings.connect_timeout + settings.read_timeout,
                session=self._session,
            )
        self._root: str | None = None
        if settings.local_files_root:
            self._root = os.path.realpath(settings.local_files_root)
            if not os.path.isdir(self._root):
                log.warning(
                    "LOCAL_FILES_DOCUMENT_ROOT %r is not a directory here: local-files images will "
                    "be downloaded from Label Studio instead",
                    settings.local_files_root,
                )

    def close(self) -> None:
        self._http.close()
        self._session.close()

    def __repr__(self) -> str:
        return f"ImageLoader(label_studio_url={self._ls_base!r}, auth={self._auth!r})"

    def load(self, url: str) -> LoadedImage:
        """Resolve, fetch and decode the image at ``url`` (a task's image value).

        Returns an RGB, EXIF-transposed :class:`LoadedImage`; raises :class:`ImageError` for every
        failure, logged at WARNING with the reason only.
        """
        try:
            return LoadedImage.from_bytes(
                self._fetch(url), url, self._settings.max_image_pixels, self.budget
            )
        except ImageError as exc:
            log.warning("image load failed: %s", exc.reason)
            raise

    # -- resolution -------------------------------------------------------------------------------

    def _fetch(self, url: str) -> bytes:
        if not isinstance(url, str):
            raise ImageError(f"the task image URL must be a string, got {type(url).__name__}")
        url = url.strip()
        if not url:
            raise ImageError("the task image URL is empty")
        if url[:5].lower() == "data:":
            return self._decode_data_uri(url)
        if url.startswith("//"):
            raise ImageError(
                "protocol-relative image URLs (//host/...) are not supported: use http(s)://host/..."
            )
        if url.startswith("/"):
            if self._ls_base is None:
                raise ImageError(
                    f"the image URL {_describe(url)} is relative to Label Studio: set "
                    "LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) so the backend can download it"
                )
            url = self._ls_base + url
        target = parse_target(url)
        local = _local_files_param(url)
        if local is not None and self._root is not None and self._is_ls(target):
            data = self._read_local_file(local)
            if data is not None:
                return data
        return self._download(url, target)

    def _is_ls(self, target: Target) -> bool:
        return self._ls_origin is not None and target.origin == self._ls_origin

    def _read_local_file(self, d: str) -> bytes | None:
        """Bytes of ``d`` under ``local_files_root``; ``None`` if no such file (then LS serves it)."""
        root = self._root or ""
        segments = [s for s in d.split("/") if s not in ("", ".")]
        real = os.path.realpath(os.path.join(root, *segments))
        if os.path.commonpath([real, root]) != root:
            raise ImageError(
                f"refusing local-files path {d[:200]!r}: it resolves outside LOCAL_FILES_DOCUMENT_ROOT"
            )
        if not os.path.isfile(real):
            return None
        limit = self._settings.max_download_bytes
        try:
            with open(real, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > limit:
                    raise ImageError(_too_big_reason(f"local file {d[:200]!r}", size, limit))
                data = handle.read(limit + 1)
        except OSError as exc:
            raise ImageError(
                f"cannot read local file {d[:200]!r} ({exc.strerror or type(exc).__name__})"
            ) from None
        if len(data) > limit:
            raise ImageError(_too_big_reason(f"local file {d[:200]!r}", len(data), limit))
        return data

    def _decode_data_uri(self, uri: str) -> bytes:
        header, comma, payload = uri.partition(",")
        params = [p.strip().lower() for p in header[5:].split(";")]
        if not comma or not params[0].startswith("image/") or "base64" not in params[1:]:
            raise ImageError(
                "unsupported data: URI: expected data:image/<type>;base64,<data>, got "
                f"{header[:60]!r}"
            )
        compact = "".join(unquote(payload).split()).replace("-", "+").replace("_", "/")
        limit = self._settings.max_download_bytes
        if len(compact) // 4 * 3 > limit + 3:
            raise ImageError(_too_big_reason("the data: URI", len(compact) // 4 * 3, limit))
        if len(compact) % 4 == 1:
            raise ImageError("the data: URI payload is not valid base64 (bad length)")
        try:
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URI payload is not valid base64") from None
        if len(data) > limit:
            raise ImageError(_too_big_reason("the data: URI", len(data), limit))
        return data

    # -- HTTP -------------------------------------------------------------------------------------

    def _download(self, url: str, target: Target) -> bytes:
        settings = self._settings
        deadline = time.monotonic() + settings.deadline_s
        send_auth = True  # becomes False for good once the chain leaves the LS origin
        retried_auth = False
        hops = 0
        while True:
            desc = _describe(target.url)
            is_ls = self._is_ls(target)
            if not is_ls:
                send_auth = False
            guarded = not is_ls and not settings.allow_private_urls
            if guarded:
                refuse_localhost_name(target.host)
            # One lookup per hop; the request below goes to one of exactly these addresses.
            addresses = resolve_host(target.host, target.port, self._resolver)
            if guarded:
                require_public(target.host, addresses)
            headers = {"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
            if send_auth and self._auth is not None:
                try:
                    headers.update(self._auth.headers())
                except LabelStudioAuthError as exc:
                    raise ImageError(exc.reason) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageError(self._deadline_reason(desc))
            response = self._request(target, addresses, headers, remaining, desc)
            reusable = False
            try:
                status = response.status
                if status in _REDIRECT_STATUSES:
                    location = (response.headers.get("Location") or "").strip()
                    if not location:
                        raise ImageError(f"HTTP {status} redirect without a Location from {desc}")
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise ImageError(
                            f"too many redirects (more than {MAX_REDIRECTS}) starting at "
                            f"{_describe(url)}"
                        )
                    # The same parser and checks as for the task URL (next loop turn).
                    next_target = parse_target(urljoin(target.url, location))
                    if next_target.origin != target.origin:
                        send_auth = False
                    target = next_target
                    continue
                if (
                    status == 401
                    and send_auth
                    and self._auth is not None
                    and self._auth.kind == "pat"
                    and not retried_auth
                ):
                    # the access token may have expired early (clock skew, revocation): once more
                    self._auth.invalidate()
                    retried_auth = True
                    continue
                if status != 200:
                    raise ImageError(self._status_reason(status, desc, is_ls and send_auth))
                data = self._read_body(response, desc, deadline)
                reusable = True
                return data
            finally:
                PinnedHTTP.finish(response, reusable=reusable)

    def _request(
        self,
        target: Target,
        addresses: list[IPAddress],
        headers: dict[str, str],
        remaining: float,
        desc: str,
    ) -> urllib3.BaseHTTPResponse:
        settings = self._settings
        try:
            return self._http.get(
                target,
                addresses,
                headers,
                connect_timeout=min(settings.connect_timeout, remaining),
                read_timeout=min(settings.read_timeout, remaining),
            )
        except urllib3.exceptions.SSLError:
            raise ImageError(
                f"TLS verification failed for {desc}: the certificate is not valid for "
                f"{target.host} or not signed by a trusted CA (set REQUESTS_CA_BUNDLE for a "
                "private CA)"
            ) from None
        except (
            # before the timeout clause: urllib3's NewConnectionError is also a ConnectTimeoutError
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.ProtocolError,
            ConnectionError,
        ) as exc:
            raise ImageError(_unreachable_reason(desc, exc)) from None
        except (urllib3.exceptions.TimeoutError, TimeoutError):
            raise ImageError(
                f"timed out downloading {desc} (connect {settings.connect_timeout:g} s, "
                f"read {settings.read_timeout:g} s): check that the host is reachable and fast"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ImageError(_unreachable_reason(desc, exc)) from None

    def _read_body(self, response: urllib3.BaseHTTPResponse, desc: str, deadline: float) -> bytes:
        limit = self._settings.max_download_bytes
        length = response.headers.get("Content-Length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                announced = -1
            if announced > limit:
                raise ImageError(_too_big_reason(desc, announced, limit))
        read = getattr(response, "read1", None) or response.read
        body = bytearray()
        try:
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(self._deadline_reason(desc))
                chunk = read(_CHUNK, decode_content=True)
                if not chunk:
                    break
                body += chunk
                if len(body) > limit:
                    raise ImageError(_too_big_reason(desc, len(body), limit, streaming=True))
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            raise ImageError(
                f"timed out reading {desc} (no data for {self._settings.read_timeout:g} s)"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ImageError(
                f"the connection broke while downloading {desc} ({type(exc).__name__}): "
                "the image arrived incomplete"
            ) from None
        return bytes(body)

    def _deadline_reason(self, desc: str) -> str:
        return (
            f"downloading {desc} took longer than the overall limit of "
            f"{self._settings.deadline_s:g} s: the server is too slow or the image too large"
        )

    def _status_reason(self, status: int, desc: str, authenticated_ls: bool) -> str:
        if authenticated_ls and status in (401, 403):
            if self._auth is None or self._auth.kind == "none":
                hint = "set LABEL_STUDIO_API_KEY to a legacy token or a personal access token"
            else:
                hint = (
                    "check that LABEL_STUDIO_API_KEY is valid for this Label Studio and that the "
                    "user can see the project"
                )
            return f"Label Studio refused the image download {desc} (HTTP {status}): {hint}"
        if status in (401, 403):
            return (
                f"HTTP {status} for {desc}: the image host wants credentials, and the backend only "
                "sends credentials to LABEL_STUDIO_URL"
            )
        if status == 404:
            return f"image not found (HTTP 404): {desc}"
        return f"HTTP {status} while downloading {desc}"


def _unreachable_reason(desc: str, exc: BaseException) -> str:
    return f"could not download {desc} ({type(exc).__name__}): check that the host is reachable from the ML backend"


def _too_big_reason(what: str, size: int, limit: int, streaming: bool = False) -> str:
    amount = f"more than {limit} bytes" if streaming else f"{size} bytes"
    return f"{what} is {amount}, over the download limit of {limit} bytes (MAX_DOWNLOAD_MB)"
