"""Where a task's image bytes come from, short of a download: URL resolution and the local sources.

A task's image value is one of:

* ``/data/upload/...``, ``/data/local-files/?d=...`` and any other path starting with ``/``:
  relative to ``LABEL_STUDIO_URL`` (:func:`absolute_url`; an error if it is not configured). With
  ``local_files_root`` (LS's ``LOCAL_FILES_DOCUMENT_ROOT``) a local-files image that exists under
  that root is read from disk (:func:`local_files_param`, :func:`read_local_file`); otherwise
  Label Studio serves it.
* an absolute ``http://`` / ``https://`` URL (downloaded by :mod:`backend.images.download`).
* a ``data:image/<type>;base64,<payload>`` URI (:func:`decode_data_uri`).
* an ``s3://``, ``gs://`` or ``azure-blob://`` URI of a cloud import storage (resolved through
  Label Studio, see :mod:`backend.images.cloud`).

Also owns :func:`describe`, the one log-safe short form of a task URL that every image reason uses
(no user info, no query except local-files' ``d``, control characters escaped), and the "over the
download limit" reason that local files, data: URIs and downloads share.

May import: :mod:`backend.errors` (``ImageError``) and :mod:`backend.images.safefetch`
(``escape``).
"""

from __future__ import annotations

import base64
import binascii
import os
from urllib.parse import parse_qs, unquote, urlsplit

from backend.errors import ImageError
from backend.images.safefetch import escape

__all__ = [
    "absolute_url",
    "decode_data_uri",
    "describe",
    "is_data_uri",
    "local_files_param",
    "read_local_file",
    "task_url",
    "too_big_reason",
]

_LOCAL_FILES_PATH = "/data/local-files"


def describe(url: str) -> str:
    """A log-safe, single-line short form of ``url``: no userinfo, no query (except local-files'
    ``d``), control characters escaped."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    if is_data_uri(url):
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


def too_big_reason(what: str, size: int, limit: int, streaming: bool = False, setting: str = "MAX_DOWNLOAD_MB") -> str:
    """``setting``: the environment variable that sets ``limit`` (MAX_VIDEO_MB for videos)."""
    amount = f"more than {limit} bytes" if streaming else f"{size} bytes"
    return f"{what} is {amount}, over the download limit of {limit} bytes ({setting})"


def task_url(url: object) -> str:
    """The task's image value, stripped; an :class:`ImageError` unless it is a non-empty string."""
    if not isinstance(url, str):
        raise ImageError(f"the task image URL must be a string, got {type(url).__name__}")
    url = url.strip()
    if not url:
        raise ImageError("the task image URL is empty")
    return url


def is_data_uri(url: str) -> bool:
    return url[:5].lower() == "data:"


def absolute_url(url: str, ls_base: str | None) -> str:
    """``url`` with a path relative to Label Studio (``/data/...``) made absolute on ``ls_base``."""
    if url.startswith("//"):
        raise ImageError(
            "protocol-relative image URLs (//host/...) are not supported: use http(s)://host/..."
        )
    if not url.startswith("/"):
        return url
    if ls_base is None:
        raise ImageError(
            f"the image URL {describe(url)} is relative to Label Studio: set "
            "LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) so the backend can download it"
        )
    return ls_base + url


def local_files_param(url: str) -> str | None:
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


def read_local_file(root: str, d: str, limit: int, setting: str = "MAX_DOWNLOAD_MB") -> bytes | None:
    """Bytes of ``d`` under ``root`` (a real path), at most ``limit`` of them; ``None`` if there
    is no such file (then LS serves it)."""
    segments = [s for s in d.split("/") if s not in ("", ".")]
    real = os.path.realpath(os.path.join(root, *segments))
    if os.path.commonpath([real, root]) != root:
        raise ImageError(
            f"refusing local-files path {d[:200]!r}: it resolves outside LOCAL_FILES_DOCUMENT_ROOT"
        )
    if not os.path.isfile(real):
        return None
    try:
        with open(real, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise ImageError(too_big_reason(f"local file {d[:200]!r}", size, limit, setting=setting))
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ImageError(
            f"cannot read local file {d[:200]!r} ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(data) > limit:
        raise ImageError(too_big_reason(f"local file {d[:200]!r}", len(data), limit, setting=setting))
    return data


def decode_data_uri(uri: str, limit: int, setting: str = "MAX_DOWNLOAD_MB") -> bytes:
    """The bytes of a ``data:image/<type>;base64,<payload>`` URI, at most ``limit`` of them."""
    header, comma, payload = uri.partition(",")
    params = [p.strip().lower() for p in header[5:].split(";")]
    if not comma or not params[0].startswith("image/") or "base64" not in params[1:]:
        raise ImageError(
            "unsupported data: URI: expected data:image/<type>;base64,<data>, got "
            f"{header[:60]!r}"
        )
    compact = "".join(unquote(payload).split()).replace("-", "+").replace("_", "/")
    if len(compact) // 4 * 3 > limit + 3:
        raise ImageError(too_big_reason("the data: URI", len(compact) // 4 * 3, limit, setting=setting))
    if len(compact) % 4 == 1:
        raise ImageError("the data: URI payload is not valid base64 (bad length)")
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URI payload is not valid base64") from None
    if len(data) > limit:
        raise ImageError(too_big_reason("the data: URI", len(data), limit, setting=setting))
    return data
