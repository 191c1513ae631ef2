"""The pinned download of one image URL: redirects, deadlines, size limits and the LS credentials.

:class:`Downloader` GETs an http(s) :class:`~backend.images.safefetch.Target` and returns its body.
Every hop (the URL and each redirect's ``Location``, at most :data:`MAX_REDIRECTS`) is parsed once
with :func:`~backend.images.safefetch.parse_target`, its host is resolved once with the injectable
``resolver``, the addresses are checked (:mod:`backend.images.urlguard`: public addresses only,
unless the hop is on the Label Studio origin or ``allow_private_urls``), and the request goes to a
checked address with ``Host``, SNI and certificate verification on the name
(:class:`~backend.images.safefetch.PinnedHTTP`).

Only URLs on the LS origin (same scheme, host and port as ``LABEL_STUDIO_URL``) get the LS
credentials, and only until a redirect leaves that origin (for the rest of the chain, even if it
comes back). A ``401`` from LS to a personal access token's access token refreshes it once.

Storage hosts: when the LS origin, asked with its credentials to resolve a cloud storage URI
(:func:`~backend.images.cloud.is_resolve_request`: ``/tasks/<id>/presign/`` and the like), answers
with a redirect to another origin, that one hop (the pre-signed storage URL) is fetched even when
its host is private: the storage endpoint is the LS admin's choice (MinIO next to LS), not the
task's. It gets no LS credentials (it is another origin), and a redirect it answers is guarded
like any other hop.

Limits (:class:`~backend.images.config.FetchSettings`): ``connect_timeout`` / ``read_timeout`` per
socket operation, ``deadline_s`` for the whole chain (checked before each request and between body
reads), ``max_download_bytes`` from ``Content-Length`` and while streaming.

Environment proxies (``HTTP(S)_PROXY``) are *not* used, neither for images nor for LS token
refreshes (:func:`auth_session`): a proxy would resolve the host itself, defeating the address
check. ``~/.netrc`` credentials and cookies are never used, so nothing but the LS ``Authorization``
header is ever sent, and only to the LS origin.

May import: the image modules below it (decode, urlguard, safefetch, sources, config) and
:mod:`backend.ls.auth` for the LS token.
"""

from __future__ import annotations

import http.cookiejar
import time
from urllib.parse import urljoin

import requests
import urllib3

from backend.images.cloud import is_resolve_request
from backend.images.config import FetchSettings
from backend.errors import ImageError
from backend.images.safefetch import PinnedHTTP, Target, parse_target
from backend.images.sources import describe, too_big_reason
from backend.images.urlguard import IPAddress, Resolver, refuse_localhost_name, require_public, resolve_host
from backend.ls.auth import AuthKind, LabelStudioAuth, LabelStudioAuthError

__all__ = ["MAX_REDIRECTS", "Downloader", "auth_session"]

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_USER_AGENT = "grounded-sam-ml-backend/1 (image fetch)"
_ACCEPT = "image/*,*/*;q=0.5"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Origin = tuple[str, str, int]


def auth_session(ca_bundle: str) -> requests.Session:
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
    session.headers["Accept"] = _ACCEPT
    return session


class Downloader:
    """GET one image URL within the limits of ``settings`` (see the module docstring).

    ``ls_origin`` is ``LABEL_STUDIO_URL``'s origin (``None`` without it), ``ls_path`` its path
    (no trailing ``/``; where LS's presign routes live) and ``auth`` its credentials; ``http``
    sends the pinned requests. Safe to share between threads.
    """

    def __init__(
        self,
        settings: FetchSettings,
        http: PinnedHTTP,
        *,
        ls_origin: Origin | None,
        auth: LabelStudioAuth | None,
        resolver: Resolver | None = None,
        ls_path: str = "",
    ) -> None:
        self._settings = settings
        self._http = http
        self._ls_origin = ls_origin
        self._ls_path = ls_path
        self._auth = auth
        self._resolver = resolver

    def is_ls(self, target: Target) -> bool:
        """Whether ``target`` is on the Label Studio origin."""
        return self._ls_origin is not None and target.origin == self._ls_origin

    def get(self, url: str, target: Target, limit: int | None = None, setting: str = "MAX_DOWNLOAD_MB") -> bytes:
        """The body of ``target`` (parsed from ``url``, the task's absolute URL) after redirects;
        at most ``limit`` bytes (default ``max_download_bytes``; videos have their own, named by
        ``setting`` in the error)."""
        settings = self._settings
        deadline = time.monotonic() + settings.deadline_s
        send_auth = True  # becomes False for good once the chain leaves the LS origin
        retried_auth = False
        storage_hop = False  # this hop is where LS's answer to a presign request points
        hops = 0
        while True:
            desc = describe(target.url)
            is_ls = self.is_ls(target)
            if not is_ls:
                send_auth = False
            guarded = not is_ls and not settings.allow_private_urls and not storage_hop
            if guarded:
                refuse_localhost_name(target.host)
            # One lookup per hop; the request below goes to one of exactly these addresses.
            addresses = resolve_host(target.host, target.port, self._resolver)
            if guarded:
                require_public(target.host, addresses)
            headers = {"User-Agent": _USER_AGENT, "Accept": _ACCEPT}
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
                            f"{describe(url)}"
                        )
                    # The same parser and checks as for the task URL (next loop turn).
                    next_target = parse_target(urljoin(target.url, location))
                    leaves = next_target.origin != target.origin
                    # Only LS's own answer to a presign request it got with our credentials (the
                    # chain never left LS) names a storage host that may be private; one hop only.
                    storage_hop = (
                        leaves and is_ls and send_auth
                        and is_resolve_request(target.request_uri, self._ls_path)
                    )
                    if leaves:
                        send_auth = False
                    target = next_target
                    continue
                if (
                    status == 401
                    and send_auth
                    and self._auth is not None
                    and self._auth.kind is AuthKind.PAT
                    and not retried_auth
                ):
                    # the access token may have expired early (clock skew, revocation): once more
                    self._auth.invalidate()
                    retried_auth = True
                    continue
                if status != 200:
                    raise ImageError(self._status_reason(
                        status, desc, is_ls and send_auth,
                        resolving=is_ls and is_resolve_request(target.request_uri, self._ls_path),
                        storage=storage_hop,
                    ))
                data = self._read_body(response, desc, deadline, limit, setting)
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

    def _read_body(self, response: urllib3.BaseHTTPResponse, desc: str, deadline: float,
                   limit: int | None = None, setting: str = "MAX_DOWNLOAD_MB") -> bytes:
        limit = self._settings.max_download_bytes if limit is None else limit
        length = response.headers.get("Content-Length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                announced = -1
            if announced > limit:
                raise ImageError(too_big_reason(desc, announced, limit, setting=setting))
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
                    raise ImageError(too_big_reason(desc, len(body), limit, streaming=True, setting=setting))
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

    def _status_reason(
        self, status: int, desc: str, authenticated_ls: bool, *, resolving: bool, storage: bool
    ) -> str:
        if resolving and status == 404:
            return (
                f"Label Studio could not resolve the cloud storage image (HTTP 404 from {desc}): "
                "no import storage of the task's project serves that bucket, or the task is gone"
            )
        if storage and status in (401, 403):
            return (
                f"the storage refused the pre-signed URL Label Studio redirected to (HTTP {status} "
                f"from {desc}): check the storage's credentials and presign TTL in Label Studio"
            )
        if authenticated_ls and status in (401, 403):
            if self._auth is None or self._auth.kind is AuthKind.NONE:
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
