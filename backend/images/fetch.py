"""The image loader: a Label Studio task's image value → :class:`LoadedImage`.

:class:`ImageLoader` ties the image modules together: it resolves the task's URL
(:mod:`backend.images.sources`: LS-relative paths, local files, data: URIs;
:mod:`backend.images.cloud`: ``s3://``/``gs://``/``azure-blob://`` URIs through LS's presign
endpoint, which needs the task's id), downloads http(s)
URLs (:mod:`backend.images.download`: the pinned fetch with its SSRF guard, redirects, deadlines
and size limits) and decodes the bytes within its :class:`~backend.images.decode.PixelBudget`
(:meth:`LoadedImage.from_bytes`). Every image returned is the *EXIF-transposed* image, converted
to RGB (see :mod:`backend.images.decode` for the frame and the decoding decisions).

Every failure is an :class:`ImageError` whose ``reason`` says what went wrong and what to fix; it is
single-line, safe to log and to return to a client (no tokens, no query strings, no response
bodies; control characters from URLs and paths escaped).

CA certificates: ``ca_bundle``, else ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` /
``CURL_CA_BUNDLE``, else certifi.

:class:`FetchSettings`, :class:`ImageError` and :class:`LoadedImage` (the types of the loader's
signature) are re-exported here, so a caller of the loader imports from this module only.

May import: every image module and :mod:`backend.ls.auth` (the LS token).
"""

from __future__ import annotations

import hashlib
import logging
import os

import requests

from backend.images.cloud import cloud_scheme, presign_url
from backend.images.config import FetchSettings
from backend.errors import ImageError
from backend.images.decode import LoadedImage, PixelBudget, decode_image
from backend.images.download import Downloader, auth_session
from backend.images.frames import FrameCache
from backend.images.safefetch import PinnedHTTP, ca_bundle_from_env, parse_target
from backend.images.sources import (
    absolute_url,
    decode_data_uri,
    describe,
    is_data_uri,
    local_files_param,
    read_local_file,
    task_url,
)
from backend.images.urlguard import Resolver
from backend.ls.auth import LabelStudioAuth

__all__ = ["FetchSettings", "ImageError", "ImageLoader", "LoadedImage"]

log = logging.getLogger(__name__)


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

    ``frames`` remembers the size each decoded image's bytes gave (by content hash, bounded), so
    ``load(..., defer=True)`` of bytes seen before skips decoding until the pixels are used.
    """

    def __init__(
        self,
        settings: FetchSettings,
        *,
        auth: LabelStudioAuth | None = None,
        session: requests.Session | None = None,
        resolver: Resolver | None = None,
        budget: PixelBudget | None = None,
        frames: FrameCache | None = None,
    ) -> None:
        self._settings = settings
        self.frames = frames if frames is not None else FrameCache()
        self.budget = budget if budget is not None else PixelBudget(settings.decode_budget_pixels)
        ca_bundle = settings.ca_bundle or ca_bundle_from_env()
        self._http = PinnedHTTP(ca_bundle)
        self._session = session if session is not None else auth_session(ca_bundle)
        self._ls_base: str | None = None
        ls_origin = None
        ls_path = ""
        self._auth: LabelStudioAuth | None = None
        if settings.label_studio_url:
            self._ls_base = settings.label_studio_url.rstrip("/")
            ls_target = parse_target(self._ls_base)
            ls_origin = ls_target.origin
            ls_path = ls_target.request_uri.split("?", 1)[0].rstrip("/")
            self._auth = auth or LabelStudioAuth(
                self._ls_base,
                settings.api_key,
                timeout=settings.connect_timeout + settings.read_timeout,
                session=self._session,
            )
        self._download = Downloader(
            settings, self._http, ls_origin=ls_origin, auth=self._auth, resolver=resolver,
            ls_path=ls_path,
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

    def load(self, url: str, task_id: object = None, defer: bool = False) -> LoadedImage:
        """Resolve, fetch and decode the image at ``url`` (a task's image value).

        ``task_id`` is the task's Label Studio id: cloud storage URIs are resolved per task
        (``/tasks/<id>/presign/``) and fail without it; other URLs ignore it. ``defer``: when these
        exact bytes (same SHA-256) were decoded before, return a :meth:`LoadedImage.deferred`
        image (size known, pixels decoded on first use) instead of decoding now. The bytes are
        fetched either way, under the same URL policy, credentials and limits.

        Returns an RGB, EXIF-transposed :class:`LoadedImage`; raises :class:`ImageError` for every
        failure, logged at WARNING with the reason only.
        """
        try:
            data = self._fetch(url, task_id)
            sha256 = hashlib.sha256(data).hexdigest()
            size = self.frames.get(sha256) if defer else None
            if size is not None:
                return LoadedImage.deferred(data, sha256, url, size, self._settings.max_image_pixels, self.budget)
            image = decode_image(data, self._settings.max_image_pixels, self.budget)
            self.frames.put(sha256, (image.width, image.height))
            return LoadedImage(image, sha256, url)
        except ImageError as exc:
            log.warning("image load failed: %s", exc.reason)
            raise

    def fetch(self, url: str, task_id: object = None, max_bytes: int | None = None,
              setting: str = "MAX_DOWNLOAD_MB") -> bytes:
        """The bytes of a task's media (a video) at ``url``, undecoded: the same URL policy,
        credentials, SSRF guard and deadlines as :meth:`load`, with ``max_bytes`` (default
        ``max_download_bytes``) as the size limit, named ``setting`` in the error. Raises
        :class:`ImageError`, logged at WARNING."""
        try:
            return self._fetch(url, task_id, max_bytes, setting)
        except ImageError as exc:
            log.warning("media fetch failed: %s", exc.reason)
            raise

    def _fetch(self, url: str, task_id: object, max_bytes: int | None = None,
               setting: str = "MAX_DOWNLOAD_MB") -> bytes:
        """The encoded bytes of the task's image: inline, from disk, or downloaded."""
        limit = self._settings.max_download_bytes if max_bytes is None else max_bytes
        url = task_url(url)
        if is_data_uri(url):
            return decode_data_uri(url, limit, setting)
        if cloud_scheme(url) is not None:
            resolve = presign_url(self._ls_base, task_id, url)
            try:
                return self._download.get(resolve, parse_target(resolve), limit, setting)
            except ImageError as exc:
                # the reason names the LS/storage URL without its query: say which image it was
                raise ImageError(f"{describe(url)} (through Label Studio): {exc.reason}") from None
        url = absolute_url(url, self._ls_base)
        target = parse_target(url)
        local = local_files_param(url)
        if local is not None and self._root is not None and self._download.is_ls(target):
            data = read_local_file(self._root, local, limit, setting)
            if data is not None:
                return data
        return self._download.get(url, target, limit, setting)
