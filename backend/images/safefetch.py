"""One HTTP GET pinned to an address that was checked: URL parsing and the pinned connection.

Two steps keep "which host?" one question with one answer:

* :func:`parse_target` reads an image URL into a :class:`Target`. It refuses URLs that parsers read
  differently (user info or ``@`` in the authority, backslashes, whitespace, control or invisible
  characters, non-standard numeric IPv4 forms, ``%`` in the host) and cross-checks Python's
  ``urlsplit`` against ``urllib3.util.parse_url``: if they disagree on scheme, host or port, the URL
  is refused. A non-ASCII host name is encoded once with the ``idna`` package (UTS-46, as requests
  does), and that ASCII name is used for the LS-origin test, the lookup, ``Host``, SNI and
  certificate checks.
* :class:`PinnedHTTP` sends the GET to one of the addresses the caller resolved and checked (see
  :mod:`backend.images.urlguard`), never resolving the name again, while the ``Host`` header, TLS SNI and
  certificate verification use the name. Connections are pooled per (address, port, name).

Environment proxies (``HTTP(S)_PROXY``) are *not* used: a proxy resolves the name itself, so the
address we checked would not be the one fetched from. CA certificates come from
``FetchSettings.ca_bundle``, else ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / ``CURL_CA_BUNDLE``
when set (a file or a directory), else certifi's bundle.

May import: :mod:`backend.errors` (``ImageError``) and :mod:`backend.images.urlguard`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import certifi
import idna
import urllib3
from urllib3.util import parse_url

from backend.errors import ImageError
from backend.images.urlguard import IPAddress, host_literal

__all__ = ["PinnedHTTP", "Target", "ca_bundle_from_env", "escape", "parse_target"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
_CA_ENV = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")


def escape(text: str, limit: int = 200) -> str:
    """``text`` on one line: non-printable characters (``\\n``, ``\\r``, ``\\x00``, ...) escaped as
    in ``repr``, cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _shown(url: str) -> str:
    """``url`` for a reason: no user info, no query or fragment (signed URLs), one line."""
    text = re.split(r"[?#]", url, maxsplit=1)[0]
    scheme, sep, rest = text.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        text = scheme + sep + authority.rpartition("@")[2] + slash + path
    return escape(text, 120)


@dataclass(frozen=True)
class Target:
    """One parsed http(s) URL, in the form the request is made.

    ``host`` is lower-case ASCII (IDNA-encoded for non-ASCII names; an IPv6 literal without
    brackets); ``port`` is explicit or the scheme's default; ``request_uri`` is the path and query
    (``/`` at least) as sent on the request line, percent-encoded as urllib3 sends it.
    """

    scheme: str
    host: str
    port: int
    request_uri: str

    @property
    def origin(self) -> tuple[str, str, int]:
        """``(scheme, host, port)``: only the LS origin gets LS credentials."""
        return self.scheme, self.host, self.port

    @property
    def host_header(self) -> str:
        """``Host`` header value: ``host`` (bracketed for IPv6), ``:port`` unless the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL as requested (the base for a redirect's relative ``Location``)."""
        return f"{self.scheme}://{self.host_header}{self.request_uri}"


def parse_target(url: str) -> Target:
    """Parse an absolute http(s) image URL, refusing anything parsers could read differently."""
    if any(not c.isprintable() for c in url):
        raise ImageError(
            "refusing an image URL with control or invisible characters (newline, tab, NUL, ...): "
            "percent-encode them"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ImageError(f"malformed image URL {_shown(url)}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        shown = scheme or "(none)"
        raise ImageError(
            f"unsupported image URL scheme {shown!r}: use http(s) URLs, data:image/... URIs, "
            "paths relative to Label Studio such as /data/upload/..., or s3://, gs://, "
            "azure-blob:// URIs of the project's cloud storage"
        )
    netloc = parts.netloc
    if "@" in netloc:
        # `user@host` is where parsers disagree most (`a\@b`, `a@b@c`), and the backend never sends
        # URL credentials anyway: refuse it outright.
        raise ImageError(
            f"refusing an image URL with user info ('...@' before the host, path "
            f"'{escape(parts.path, 80)}'): task image URLs must not carry credentials; the backend "
            "only sends LABEL_STUDIO_API_KEY, and only to LABEL_STUDIO_URL"
        )
    if "\\" in netloc or "%" in netloc or any(c.isspace() for c in netloc):
        raise ImageError(
            f"refusing the image URL host part '{escape(netloc, 100)}': backslashes, '%' and "
            "spaces in the host are read differently by different URL parsers"
        )
    raw_host = parts.hostname or ""
    if not raw_host:
        raise ImageError(f"image URL {_shown(url)} has no host")
    host = _ascii_host(raw_host, bracketed=netloc.startswith("["))
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    # Cross-check with the parser urllib3 (and so requests) uses: any disagreement is refused.
    try:
        theirs = parse_url(url)
    except (urllib3.exceptions.LocationParseError, ValueError):
        raise ImageError(f"malformed image URL {_shown(url)}") from None
    their_host = (theirs.host or "").lower()
    if their_host.startswith("[") and their_host.endswith("]"):
        their_host = str(ipaddress.ip_address(their_host[1:-1]))
    their_port = theirs.port if theirs.port is not None else _DEFAULT_PORTS.get(scheme)
    if (theirs.scheme or "").lower() != scheme or their_host != host or their_port != port:
        raise ImageError(
            f"refusing the ambiguous image URL {_shown(url)}: URL parsers disagree on its "
            "host; write it as scheme://host[:port]/path"
        )
    return Target(scheme, host, port, theirs.request_uri or "/")


def _ascii_host(raw: str, *, bracketed: bool) -> str:
    """The one ASCII spelling of ``raw`` (urlsplit's lower-cased hostname) used everywhere."""
    if bracketed:
        try:
            return str(ipaddress.IPv6Address(raw))
        except ValueError:
            raise ImageError(
                f"malformed IPv6 address [{escape(raw, 60)}] in the image URL"
            ) from None
    if raw.isascii():
        host = raw.lower()
    else:
        try:
            host = idna.encode(raw, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ImageError(
                f"refusing the image host '{escape(raw, 100)}': not a valid internationalized "
                "domain name"
            ) from None
    literal = host_literal(host)  # raises for numeric forms other than a.b.c.d
    if literal is not None:
        return str(literal)
    if not _HOST_NAME.fullmatch(host):
        raise ImageError(
            f"refusing the image host '{escape(host, 100)}': a host name may only contain "
            "letters, digits, '-', '_' and dots"
        )
    return host


def ca_bundle_from_env() -> str:
    """The CA file or directory to verify TLS with: the first of ``_CA_ENV`` set, else certifi."""
    for name in _CA_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return certifi.where()


class PinnedHTTP:
    """GET requests sent to a given, already checked address (see the module docstring).

    Thread-safe; holds at most ``num_pools`` connection pools (LRU), each keyed by address, port,
    scheme and the TLS name, so a reused connection always goes to an address that was checked.
    """

    def __init__(self, ca_bundle: str, num_pools: int = 32) -> None:
        ca = {"ca_cert_dir": ca_bundle} if os.path.isdir(ca_bundle) else {"ca_certs": ca_bundle}
        self._manager = urllib3.PoolManager(
            num_pools=num_pools, maxsize=4, block=False, cert_reqs="CERT_REQUIRED", **ca
        )

    def get(
        self,
        target: Target,
        addresses: Sequence[IPAddress],
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> urllib3.BaseHTTPResponse:
        """Send ``GET target.request_uri`` to the first of ``addresses`` that accepts a connection.

        The response is not preloaded and not redirected; the caller reads and releases it
        (:meth:`finish`). Raises urllib3 exceptions (the last connection error when no address
        accepts one).
        """
        sent = {**headers, "Host": target.host_header}
        pool_kwargs = None
        if target.scheme == "https":
            # SNI and the certificate check are on the name, not on the address connected to.
            pool_kwargs = {"server_hostname": target.host, "assert_hostname": target.host}
        timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        last: Exception | None = None
        for addr in addresses:
            pool = self._manager.connection_from_host(
                str(addr), target.port, target.scheme, pool_kwargs=pool_kwargs
            )
            try:
                return pool.urlopen(
                    "GET",
                    target.request_uri,
                    headers=sent,
                    retries=False,
                    redirect=False,
                    timeout=timeout,
                    preload_content=False,
                    decode_content=True,
                    assert_same_host=False,
                )
            except urllib3.exceptions.NewConnectionError as exc:
                last = exc  # refused / unreachable: try the next checked address
        raise last if last is not None else ValueError("no address to connect to")

    @staticmethod
    def finish(response: urllib3.BaseHTTPResponse, *, reusable: bool) -> None:
        """Give the connection back; close it first unless the body was read to the end."""
        if not reusable:
            response.close()
        response.release_conn()

    def close(self) -> None:
        self._manager.clear()
