"""Decode image bytes into the RGB, EXIF-transposed PIL image every model output refers to.

Frames: :func:`decode_image` returns the *EXIF-transposed* image, converted to RGB. Its
``width``/``height`` are what Label Studio displays (browsers apply the EXIF orientation), so box and
mask coordinates computed on it map straight to LS percentages.

Every failure is an :class:`ImageError` whose ``reason`` says what went wrong and what to fix; it is
safe to log and to return to a client. :class:`ImageError` lives in :mod:`backend.errors` (the engine
raises it too), so the URL modules import it from there without loading PIL.

:class:`LoadedImage` is a decoded task image with its digest and URL; :meth:`LoadedImage.from_bytes`
is the one way bytes become one (the loader, the CLI and the benchmarks all use it).

May import: :mod:`backend.errors` (foundation) only; no other image module.

Decisions worth knowing:

* Transparent pixels (RGBA, LA, palette or grayscale/RGB with a ``transparency`` entry) are
  composited onto **white**, the background a browser shows for a transparent image on a plain page.
* 16/32-bit integer grayscale (``I;16*``, ``I``) is clipped to 0..65535 and scaled to 8 bits by
  dividing by 257; float (``F``) is clipped to 0..255.
* Only browser-displayable formats are decoded (:data:`ALLOWED_FORMATS`); EPS, PDF, PSD and the
  other exotic Pillow plugins are refused so hostile bytes never reach them (EPS would start
  Ghostscript).
* ``PIL.Image.MAX_IMAGE_PIXELS`` is never changed. Pillow itself refuses images over
  ``2 * Image.MAX_IMAGE_PIXELS`` (about 179 M pixels) while opening them, so the effective limit is
  ``min(max_image_pixels, 2 * Image.MAX_IMAGE_PIXELS)``; raise Pillow's limit once at start-up if
  larger images are ever needed. Between ``Image.MAX_IMAGE_PIXELS`` and twice that Pillow emits a
  ``DecompressionBombWarning`` (not an error unless warnings are configured as errors).
* Decoding memory is bounded by a :class:`PixelBudget` (``DECODE_BUDGET_MP``) that the caller
  passes in: the :class:`~backend.images.fetch.ImageLoader` owns one, and a process has one loader
  (its pipeline's). A decode reserves its image's pixel count from the header check until the RGB
  image is built, so the pipeline's many loader threads (and concurrent requests) never decode
  more than the budget at once. Decoding peaks at about 3-8 bytes per pixel (decoded
  buffer, EXIF transpose copy, RGBA → RGB), so 100 MP in flight is roughly 0.3-0.8 GB.
"""

from __future__ import annotations

import hashlib
import io
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageError

__all__ = ["ALLOWED_FORMATS", "ImageError", "LoadedImage", "PixelBudget", "decode_image", "to_rgb"]

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "ICO")


class PixelBudget:
    """A counting semaphore in pixels: how many pixels may be decoded at once.

    :meth:`acquire` waits until the pixels fit in what is left and returns the amount charged; an
    image larger than the whole capacity is charged the capacity, so it waits for the budget to be
    empty and then decodes alone (one image always fits). :meth:`release` gives the charge back.

    ``capacity`` is fixed at construction. ``in_use`` (pixels charged now), ``peak`` (the most ever
    charged at once) and ``waiting`` (callers waiting for pixels now) are read-only counters for
    tests and diagnostics: only this class changes them, under its lock.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a pixel budget needs a capacity of at least 1 pixel, got {capacity!r}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self.waiting = 0
        self._changed = threading.Condition()

    def acquire(self, pixels: int, timeout: float | None = None) -> int | None:
        """Wait until ``pixels`` fit; the charge to pass to :meth:`release`, or None on timeout
        (``timeout=0``: do not wait)."""
        charge = min(pixels, self.capacity)
        with self._changed:
            self.waiting += 1
            try:
                if not self._changed.wait_for(lambda: self.in_use + charge <= self.capacity, timeout):
                    return None
            finally:
                self.waiting -= 1
            self.in_use += charge
            self.peak = max(self.peak, self.in_use)
            return charge

    def release(self, charge: int) -> None:
        with self._changed:
            self.in_use -= charge
            self._changed.notify_all()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[int]:
        charge = self.acquire(pixels)
        if charge is None:  # cannot happen: without a timeout acquire waits until the pixels fit
            raise RuntimeError("pixel budget: acquire without a timeout returned nothing")
        try:
            yield charge
        finally:
            self.release(charge)


def _not_an_image_reason(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if (
        head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body"))
        or b"<html" in head
    ):
        return (
            "the server returned an HTML/XML page, not an image (a login or error page? "
            "check the URL and LABEL_STUDIO_API_KEY)"
        )
    if head.startswith((b"{", b"[")):
        return "the server returned JSON, not an image (an API error? check the URL)"
    return (
        "the data is not an image in a supported format "
        f"({', '.join(ALLOWED_FORMATS)}), or it is corrupt"
    )


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded Pillow image to 8-bit RGB (see the module notes for the choices)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)
        gray = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            if mode == "La":
                image = image.convert("LA")
            return _composite_on_white(image.convert("RGBA"))
        if mode == "RGB":
            return image
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"cannot convert image mode {mode!r} to RGB ({exc})") from None


def decode_image(data: bytes, max_image_pixels: int, budget: PixelBudget | None = None) -> Image.Image:
    """Decode ``data`` into an RGB, EXIF-transposed image, refusing more than ``max_image_pixels``.

    The pixel count is checked from the header before any pixel data is decoded; the decode then
    waits for that many pixels of ``budget`` (``None``: no budget, the caller decodes one image at a
    time, like the CLI). Every failure (empty, corrupt, truncated, not an image, too large,
    unsupported mode) is an :class:`ImageError`.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        opened = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(_too_many_pixels_reason(None, max_image_pixels)) from None
    except UnidentifiedImageError:
        raise ImageError(_not_an_image_reason(data)) from None
    except Exception as exc:  # Pillow plugins raise many types (SyntaxError, struct.error, ...)
        raise ImageError(
            f"the image is corrupt or truncated: cannot read its header ({_exc_detail(exc)})"
        ) from None
    with opened:
        width, height = opened.size
        if width <= 0 or height <= 0:
            raise ImageError(f"the image has an invalid size {width}x{height}")
        if width * height > max_image_pixels:
            raise ImageError(_too_many_pixels_reason((width, height), max_image_pixels))
        if budget is None:
            return _decode_pixels(opened, width, height, max_image_pixels)
        with budget.reserve(width * height):
            return _decode_pixels(opened, width, height, max_image_pixels)


class LoadedImage:
    """A task image: its size, digest and URL, and its pixels (decoded now, or on first use).

    ``image`` is RGB and EXIF-transposed: its size is the size LS displays, and the pixel frame all
    model outputs refer to. ``sha256`` is the hex digest of the downloaded (encoded) bytes, ``url``
    the task URL as given. ``width``/``height`` are the EXIF-transposed size, known without decoding
    for a :meth:`deferred` image. Compared by identity (PIL images are not hashable).
    """

    def __init__(self, image: Image.Image, sha256: str, url: str):
        self.sha256, self.url = sha256, url
        self.width, self.height = image.width, image.height
        self._image: Image.Image | None = image
        self._pending: tuple[bytes, int, PixelBudget | None] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_bytes(
        cls, data: bytes, url: str, max_image_pixels: int, budget: PixelBudget | None = None
    ) -> LoadedImage:
        """Decode ``data`` (see :func:`decode_image`) and digest it: the one way bytes become a
        task image, for the loader, the CLI and the benchmarks alike."""
        image = decode_image(data, max_image_pixels, budget)
        return cls(image=image, sha256=hashlib.sha256(data).hexdigest(), url=url)

    @classmethod
    def deferred(cls, data: bytes, sha256: str, url: str, size: tuple[int, int], max_image_pixels: int,
                 budget: PixelBudget | None = None) -> LoadedImage:
        """An image whose bytes decoded before to ``size`` (width, height; see
        :class:`~backend.images.frames.FrameCache`): decoded only if :attr:`image` is read, with
        the same limits as :meth:`from_bytes`. Holds the encoded bytes until then."""
        loaded = cls.__new__(cls)
        loaded.sha256, loaded.url = sha256, url
        loaded.width, loaded.height = size
        loaded._image, loaded._pending = None, (data, max_image_pixels, budget)
        loaded._lock = threading.Lock()
        return loaded

    @property
    def decoded(self) -> bool:
        """Whether the pixels are in memory (False for a :meth:`deferred` image not used yet)."""
        return self._image is not None

    @property
    def image(self) -> Image.Image:
        """The RGB, EXIF-transposed pixels; a deferred image decodes here, once (thread-safe)."""
        with self._lock:
            if self._image is None:
                data, max_image_pixels, budget = self._pending  # type: ignore[misc]
                image = decode_image(data, max_image_pixels, budget)
                if (image.width, image.height) != (self.width, self.height):  # same bytes, same decoder
                    raise ImageError(f"the image decoded to {image.width}x{image.height}, not the "
                                     f"{self.width}x{self.height} recorded for its bytes")
                self._image, self._pending = image, None
            return self._image

    def pixels(self) -> Image.Image:
        """:attr:`image` as a call: hand ``loaded.pixels`` to code that needs the pixels only
        sometimes (a click on a cached embedding never calls it)."""
        return self.image


def _decode_pixels(opened: Image.Image, width: int, height: int, max_image_pixels: int) -> Image.Image:
    """Load, EXIF-transpose and convert an opened image (the memory-heavy part of decoding)."""
    try:
        opened.load()
        return to_rgb(ImageOps.exif_transpose(opened))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(_too_many_pixels_reason((width, height), max_image_pixels)) from None
    except Exception as exc:  # truncated/corrupt data: OSError, SyntaxError, ValueError, ...
        raise ImageError(f"the image is corrupt or truncated ({_exc_detail(exc)})") from None


def _exc_detail(exc: Exception) -> str:
    """``Type: first line of the message`` (Pillow messages carry no secrets), at most ~200 chars."""
    lines = str(exc).splitlines()
    message = lines[0][:200] if lines else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _too_many_pixels_reason(size: tuple[int, int] | None, limit: int) -> str:
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "too many pixels"
    return (
        f"the image is {what}, over the limit of {limit} pixels (MAX_IMAGE_PIXELS; Pillow also "
        f"refuses more than {2 * (Image.MAX_IMAGE_PIXELS or 0)}): downscale it"
    )


def _allowed_formats() -> list[str]:
    Image.init()
    return [name for name in ALLOWED_FORMATS if name in Image.OPEN]
