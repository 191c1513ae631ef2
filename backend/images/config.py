"""FetchSettings: how task images are fetched and decoded, validated once when built.

Owns the limits every other image module reads (timeouts, download size, pixel limits, the decode
budget's capacity) and the Label Studio address and key. Built from the environment by the pipeline
(``backend.pipeline.predict.fetch_settings``); nothing here reads the environment itself.

May import: :mod:`backend.errors` (``ImageError``), :mod:`backend.images.safefetch` and
:mod:`backend.images.sources` (to check and describe ``LABEL_STUDIO_URL``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backend.errors import ImageError
from backend.images.safefetch import parse_target
from backend.images.sources import describe

__all__ = ["FetchSettings"]


@dataclass(frozen=True)
class FetchSettings:
    """How images are fetched. Built once from the environment (``backend.settings``).

    ``ca_bundle`` is a CA file or directory for https image hosts; ``None`` means
    ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / ``CURL_CA_BUNDLE`` when set, else certifi's bundle.

    ``decode_budget_pixels`` is the capacity of the loader's :class:`~backend.images.decode.PixelBudget`:
    how many pixels its loads may decode at once (``DECODE_BUDGET_MP``).

    ``total_timeout`` bounds one whole :meth:`~backend.images.fetch.ImageLoader.load` call (all
    redirects and the body); ``None`` means ``connect_timeout + read_timeout``. It is checked before each request and between
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
                    f"http://localhost:8080, got {describe(self.label_studio_url)} ({reason})"
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
        """Seconds one ``ImageLoader.load`` may take (see ``total_timeout``)."""
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
