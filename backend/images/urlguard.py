"""SSRF guard: which addresses an image host has, and whether they are public.

:class:`backend.images.download.Downloader` resolves each hop's host *once* with :func:`resolve_host`,
checks those very addresses with :func:`require_public` (unless the hop is on the Label Studio
origin or ``ALLOW_PRIVATE_URLS`` is set) and then connects to one of them
(:mod:`backend.images.safefetch`), so a DNS-rebinding host cannot answer a public address to the check
and a private one to the connect.
:func:`check_public_host` is both steps in one, for callers that only want the verdict.

Host forms that parsers read differently are refused outright (:func:`host_literal`): numeric IPv4
forms other than four decimal numbers (``2130706433``, ``0177.0.0.1``, ``127.1``, ``0x7f.1``,
``0``), which ``inet_aton`` and ``ipaddress`` disagree on. ``localhost`` and ``*.localhost`` (with
or without a trailing dot) count as loopback without a lookup (RFC 6761).

Every failure raises :class:`~backend.images.decode.ImageError` with a single-line reason.

May import: :mod:`backend.errors` (``ImageError``) only.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any

from backend.errors import ImageError

__all__ = [
    "IPAddress",
    "Resolver",
    "check_public_host",
    "host_literal",
    "is_localhost_name",
    "non_public_reason",
    "refuse_localhost_name",
    "require_public",
    "resolve_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``socket.getaddrinfo``'s signature: ``resolver(host, port, type=socket.SOCK_STREAM)``.
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

# NAT64 well-known prefix: the low 32 bits are an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# WHATWG URL: a host whose last label is a number is an IPv4 address (in any of inet_aton's forms).
_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")


def non_public_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` must not be fetched from, or ``None`` when it is a public address."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is None and addr.teredo is not None:
            embedded = addr.teredo[1]
        if embedded is not None:
            inner = non_public_reason(embedded)
            if inner is not None:
                return f"an IPv6 address embedding a {inner} IPv4 address"
        # fec0::/10 is deprecated (RFC 3879) but still routed inside some sites; Python calls it
        # global, so it needs its own check.
        if addr.is_site_local:
            return "site-local"
    for flag, name in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(addr, flag):
            return name
    if not addr.is_global:
        return "non-global"
    return None


def is_localhost_name(host: str) -> bool:
    """``localhost`` or a name under it (RFC 6761), with or without one trailing dot."""
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name
    return name == "localhost" or name.endswith(".localhost")


def host_literal(host: str) -> IPAddress | None:
    """The IP address ``host`` spells (``1.2.3.4``, ``::1``, ``[::1]``), or ``None`` for a name.

    Raises :class:`ImageError` for numeric IPv4 forms that are not four decimal numbers: they mean
    one address to ``inet_aton``/``getaddrinfo`` and none to ``ipaddress``, so they are refused
    rather than interpreted.
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    labels = name.split(".")
    if labels and labels[-1] == "":
        labels.pop()
    if labels and _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ImageError(
            f"refusing the image host {name[:100]!r}: it is a numeric IPv4 address in a "
            "non-standard form; write IPv4 addresses as four decimal numbers (a.b.c.d)"
        )
    return None


def resolve_host(host: str, port: int, resolver: Resolver | None = None) -> list[IPAddress]:
    """Every address ``host`` resolves to, in the resolver's order, without duplicates.

    IP literals are returned as they are, without a lookup. ``resolver`` defaults to
    ``socket.getaddrinfo``; it is called exactly once per call here.
    """
    literal = host_literal(host)
    if literal is not None:
        return [literal]
    lookup = resolver if resolver is not None else socket.getaddrinfo
    try:
        infos = lookup(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ImageError(
            f"cannot resolve the image host {host[:100]!r} ({type(exc).__name__}): check the URL"
        ) from None
    addresses: list[IPAddress] = []
    for info in infos:
        try:
            addr = ipaddress.ip_address(str(info[4][0]))
        except (ValueError, IndexError, TypeError):
            continue  # not an IP socket address
        if addr not in addresses:
            addresses.append(addr)
    if not addresses:
        raise ImageError(f"the image host {host[:100]!r} resolved to no usable address")
    return addresses


def refuse_localhost_name(host: str) -> None:
    """Raise :class:`ImageError` for ``localhost`` names (checked before any lookup)."""
    if is_localhost_name(host):
        raise ImageError(
            f"refusing to fetch an image from {host[:100]!r}: it is a loopback name; only public "
            "hosts or the Label Studio host itself are allowed. Set ALLOW_PRIVATE_URLS=true if "
            "images really live on a private network"
        )


def require_public(host: str, addresses: Sequence[IPAddress]) -> None:
    """Raise :class:`ImageError` for a localhost name or any non-public address."""
    refuse_localhost_name(host)
    for addr in addresses:
        why = non_public_reason(addr)
        if why is not None:
            raise ImageError(
                f"refusing to fetch an image from {host[:100]!r}: it resolves to a {why} address "
                f"({addr}); only public hosts or the Label Studio host itself are allowed. "
                "Set ALLOW_PRIVATE_URLS=true if images really live on a private network"
            )


def check_public_host(
    host: str, port: int | None, resolver: Resolver | None = None
) -> list[IPAddress]:
    """Resolve ``host`` once and raise :class:`ImageError` unless every address is public.

    IP literals (``10.0.0.1``, ``::1``, ``[fe80::1]``, ``::ffff:127.0.0.1``) are checked without any
    lookup. Loopback, private, link-local, site-local, reserved, multicast, unspecified and other
    non-global addresses (also when embedded in IPv4-mapped, 6to4, Teredo or NAT64 IPv6 addresses)
    are refused. Returns the checked addresses, the only ones a caller may connect to. Nothing is
    connected to here.
    """
    if not isinstance(host, str) or not host.strip():
        raise ImageError("the image URL has no host name")
    name = host.strip()
    refuse_localhost_name(name)
    addresses = resolve_host(name, port or 0, resolver)
    require_public(name[1:-1] if name.startswith("[") else name, addresses)
    return addresses
