"""SSRF guard: refuse image hosts that resolve to anything but public addresses.

:func:`check_public_host` is called by :class:`backend.images.ImageLoader` for every URL (and every
redirect hop) that is not on the Label Studio origin, unless ``ALLOW_PRIVATE_URLS`` is set. It
raises :class:`~backend.imagedecode.ImageError` (re-exported by :mod:`backend.images`).

Known gap: the guard resolves the host before the request and requests resolves it again when it
connects, so a DNS-rebinding host could answer differently the second time. Redirect targets are
checked again at each hop.
"""

from __future__ import annotations

import ipaddress
import socket

from backend.imagedecode import ImageError

__all__ = ["check_public_host"]

# NAT64 well-known prefix: the low 32 bits are an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _non_public_reason(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` must not be fetched from, or ``None`` when it is a public address."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is None and addr.teredo is not None:
            embedded = addr.teredo[1]
        if embedded is not None:
            inner = _non_public_reason(embedded)
            if inner is not None:
                return f"an IPv6 address embedding a {inner} IPv4 address"
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


def check_public_host(host: str, port: int | None) -> None:
    """Raise :class:`ImageError` unless every address ``host`` resolves to is public.

    IP literals (``10.0.0.1``, ``::1``, ``[fe80::1]``, ``::ffff:127.0.0.1``) are checked without any
    lookup; names are resolved with ``socket.getaddrinfo`` and *all* returned addresses must be
    public. Loopback, private, link-local, reserved, multicast, unspecified and other non-global
    addresses (also when embedded in IPv4-mapped, 6to4, Teredo or NAT64 IPv6 addresses) are refused.
    Nothing is connected to.
    """
    if not isinstance(host, str) or not host.strip():
        raise ImageError("the image URL has no host name")
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        addresses = [ipaddress.ip_address(name)]
    except ValueError:
        addresses = []
    if not addresses:
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ImageError(
                f"cannot resolve the image host {name!r} ({type(exc).__name__}): check the URL"
            ) from None
        for info in infos:
            try:
                addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
            except ValueError:
                continue
        if not addresses:
            raise ImageError(f"the image host {name!r} resolved to no usable address")
    for addr in addresses:
        why = _non_public_reason(addr)
        if why is not None:
            raise ImageError(
                f"refusing to fetch an image from {name!r}: it resolves to a {why} address "
                f"({addr}); only public hosts or the Label Studio host itself are allowed. "
                "Set ALLOW_PRIVATE_URLS=true if images really live on a private network"
            )
