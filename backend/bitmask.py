"""Label Studio bitmask PNG: a mask as the ``imageDataURL`` of a ``<BitmaskLabels>`` region, written
band-wise like the brush RLE (:mod:`backend.rle`).

What LS itself writes for a drawn bitmask (LS 1.23.2, ``libs/editor/src/regions/BitmaskRegion.jsx``,
``getImageSnapshotCanvas`` + ``toDataURL("image/png")``): a PNG of the image's natural size, black
where the mask is and fully transparent elsewhere, RGBA (0, 0, 0, 255) / (0, 0, 0, 0). Reading one
back it draws the PNG on a canvas of the PNG's own size and takes alpha > 0 as the region (its
colour, its outline, hover, bounds). We write the same pixels as 8-bit grey + alpha (PNG colour
type 4, "LA"): (0, 255) on the mask, (0, 0) elsewhere, which every decoder expands to LS's RGBA,
in half the bytes of RGBA.

Band-wise: a mask arrives as the crop of its foreground's bounding box, and only the crop's rows
are compressed per mask. A PNG's pixels are one zlib stream of filtered rows; ours is assembled
from raw-deflate segments that each end on a byte boundary (a sync flush, so they concatenate into
one valid stream):

- the transparent rows above and below the crop are all-zero scanlines: compressed once per image
  width and power-of-two row count, and cached (:func:`_zero_rows`), so they cost a lookup;
- the crop's rows (filter type 0: a 0 byte, then (0, alpha) per pixel), compressed by ISA-L
  (python-isal; the standard library's zlib when it is missing: the same pixels, 2.6-4.5x slower);
- an empty final block, then the Adler-32 of all the rows: ISA-L's over the crop's rows, and for
  each zero run the checksum's own arithmetic (n zero bytes keep A and add n * A to B).

The container around it (signature, IHDR, IDAT, IEND, each chunk's CRC-32) is the PNG
specification's; every compressed byte comes from the deflate library. Why not Pillow or OpenCV:
they compress every row of the image, ~10 ms for a small object at 1080p and ~140 ms at 12 MP
against ~0.13 ms and ~7 ms here (bench/RESULTS.md, "Bitmask PNG").

Decoding (:func:`png_to_mask`) is Pillow's, with the size checked before any pixel is inflated.
Imports numpy, Pillow (decoding only) and the RLE module's argument check.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import struct
import zlib

import numpy as np

from backend.rle import int_at_least

try:  # ISA-L's deflate: ~25x zlib's speed on mask rows, and smaller (bench/RESULTS.md, "Bitmask PNG")
    from isal import isal_zlib as _deflate

    DEFLATE_LIBRARY = "isal"
except ImportError:  # pragma: no cover - requirements.txt installs isal
    _deflate = zlib
    DEFLATE_LIBRARY = "zlib"

__all__ = ["DATA_URL_PREFIX", "crop_to_png", "data_url_to_png", "mask_to_png", "png_data_url", "png_to_mask"]

DATA_URL_PREFIX = "data:image/png;base64,"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LEVEL = 1  # ISA-L's 1 (of 0-3): as small as its 2 on masks, faster; its 3 was larger and 4x slower
_CHANNELS = 2  # grey + alpha
_ADLER_MOD = 65521
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no preset dictionary (FLEVEL is only a hint)
_FINAL_BLOCK = b"\x03\x00"  # an empty final block (fixed Huffman, end of block), byte-aligned
_MAX_SIDE = 2**31 - 1  # PNG's limit for width and height
_MAX_CHUNK = 2**30  # IDAT data per chunk (PNG's limit is 2**31 - 1 bytes)


def crop_to_png(crop: np.ndarray, top: int, left: int, height: int, width: int) -> bytes:
    """The LS bitmask PNG of a ``height x width`` mask that is background outside one rectangle.

    ``crop``: (h, w) bool or numeric (nonzero is foreground), the rows ``top .. top + h - 1`` and
    columns ``left .. left + w - 1`` of the full mask (e.g. a ``CompactMask``'s crop); h or w may be
    0 (an empty mask: a fully transparent PNG). Returns PNG bytes: colour type 4 (8-bit grey +
    alpha), ``width x height``, (0, 255) on the mask and (0, 0) elsewhere. Work grows with the
    crop's rows, not the image's.
    """
    arr = _foreground(crop)
    h, w = arr.shape
    height, width = _side(height, "height"), _side(width, "width")
    top, left = int_at_least(top, "top", 0), int_at_least(left, "left", 0)
    if (h and top + h > height) or (w and left + w > width):
        raise ValueError(f"crop rows [{top}, {top + h}) and columns [{left}, {left + w}) do not fit in a "
                         f"{width}x{height} mask; need top + h <= height and left + w <= width")
    row_bytes = 1 + _CHANNELS * width  # the filter-type byte, then the pixels
    if row_bytes * height >= 2**47:
        raise ValueError(f"a {width}x{height} bitmask is too large to encode")
    if h == 0 or w == 0:
        h, top = 0, 0
    rows = np.zeros((h, row_bytes), np.uint8)
    if h:
        # filter byte 0 (none) and grey 0 stay zero; alpha is byte 2 + 2 * x of each row
        rows[:, 2 + 2 * left:2 + 2 * (left + w):2] = arr.view(np.uint8) * np.uint8(255)
    band = memoryview(rows).cast("B") if h else b""
    compressor = _deflate.compressobj(_LEVEL, zlib.DEFLATED, -15)
    above, below = top, height - top - h
    parts = [*_zero_rows(above, row_bytes, _deflate), compressor.compress(band), compressor.flush(zlib.Z_SYNC_FLUSH),
             *_zero_rows(below, row_bytes, _deflate)]
    adler = _adler32_zeros(1, above * row_bytes)
    adler = _adler32_zeros(_deflate.adler32(band, adler), below * row_bytes)
    idat = b"".join([_ZLIB_HEADER, *parts, _FINAL_BLOCK, struct.pack(">I", adler)])
    header = struct.pack(">IIBBBBB", width, height, 8, 4, 0, 0, 0)  # 8-bit, grey + alpha, no interlace
    data = [_chunk(b"IDAT", idat[at:at + _MAX_CHUNK]) for at in range(0, len(idat), _MAX_CHUNK)]
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", header), *data, _chunk(b"IEND", b"")])


def mask_to_png(mask: np.ndarray) -> bytes:
    """The LS bitmask PNG of a full (H, W) mask (bool or numeric, nonzero is foreground)."""
    arr = _foreground(mask)
    if arr.size == 0:
        raise ValueError(f"mask has no pixels (shape {arr.shape}); height and width must be >= 1")
    rows, cols = np.flatnonzero(arr.any(axis=1)), np.flatnonzero(arr.any(axis=0))
    if not rows.size:
        return crop_to_png(np.zeros((0, 0), bool), 0, 0, *arr.shape)
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return crop_to_png(arr[top:bottom, left:right], top, left, *arr.shape)


def png_data_url(png: bytes) -> str:
    """``data:image/png;base64,...``: what a region's ``value.imageDataURL`` holds."""
    return DATA_URL_PREFIX + base64.b64encode(png).decode("ascii")


def data_url_to_png(url: str) -> bytes:
    """The PNG bytes of an ``imageDataURL`` (``data:image/png;base64,...``); ValueError otherwise."""
    if not isinstance(url, str) or not url[:len(DATA_URL_PREFIX)].lower() == DATA_URL_PREFIX:
        raise ValueError(f"imageDataURL must start with {DATA_URL_PREFIX!r}, got {str(url)[:40]!r}")
    try:
        return base64.b64decode(url[len(DATA_URL_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("imageDataURL is not valid base64 after its data:image/png;base64, prefix") from None


def png_to_mask(png: bytes | str, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A bitmask PNG (bytes or its data URL) → bool (H, W) mask: alpha > 0, as LS reads it.

    ``height``/``width``: the size the PNG must have (the region's ``original_height`` /
    ``original_width``), checked before its pixels are decoded; ValueError when it differs or the
    data is not a PNG. A PNG without alpha is opaque everywhere, so its mask is all True (as LS
    shows it).
    """
    from PIL import Image, UnidentifiedImageError  # the encoder does not need Pillow

    data = data_url_to_png(png) if isinstance(png, str) else bytes(png)
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("the bitmask is not a PNG (no PNG signature)")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise ValueError(f"the bitmask PNG cannot be read: {exc}") from None
    with image:
        if height is not None and width is not None and image.size != (width, height):
            raise ValueError(f"the bitmask PNG is {image.size[0]}x{image.size[1]}, the image {width}x{height}: "
                             "LS draws a bitmask at its PNG's size, so it must be the image's")
        try:
            if "A" in image.getbands():
                alpha = image.getchannel("A")
            elif "transparency" in image.info:
                alpha = image.convert("RGBA").getchannel("A")
            else:
                return np.ones((image.height, image.width), bool)
            return np.asarray(alpha) > 0
        except (OSError, SyntaxError, ValueError, zlib.error) as exc:
            raise ValueError(f"the bitmask PNG's pixels cannot be decoded: {exc}") from None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


@functools.lru_cache(maxsize=4096)  # ~12 entries (~8 KB) per image width at 1080p
def _zero_segment(rows: int, row_bytes: int, deflate) -> bytes:
    """Raw deflate of ``rows`` all-zero scanlines, ending on a byte boundary (sync flush): ~1 byte per
    1 KB of zeros. ISA-L gets there as it is; zlib needs its run-length strategy (4.5x more without),
    which ISA-L does not take."""
    strategy = () if deflate.__name__.startswith("isal") else (9, zlib.Z_RLE)
    compressor = deflate.compressobj(_LEVEL, zlib.DEFLATED, -15, *strategy)
    return compressor.compress(bytes(rows * row_bytes)) + compressor.flush(zlib.Z_SYNC_FLUSH)


def _zero_rows(rows: int, row_bytes: int, deflate) -> list[bytes]:
    """``rows`` zero scanlines as cached segments of 1, 2, 4, ... rows (at most log2(rows) + 1)."""
    parts, size = [], 1
    while rows:
        if rows & 1:
            parts.append(_zero_segment(size, row_bytes, deflate))
        rows >>= 1
        size <<= 1
    return parts


def _adler32_zeros(value: int, count: int) -> int:
    """Adler-32 ``value`` continued over ``count`` zero bytes: A is unchanged, B grows by count * A."""
    a, b = value & 0xFFFF, value >> 16
    return ((b + count % _ADLER_MOD * a) % _ADLER_MOD) << 16 | a


def _foreground(mask) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.number)
                                  and not np.issubdtype(arr.dtype, np.complexfloating)):
        raise TypeError(f"a mask must be a bool or real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (rows, columns), got shape {arr.shape}")
    return arr if arr.dtype == bool else arr != 0


def _side(value, name: str) -> int:
    side = int_at_least(value, name, 1)
    if side > _MAX_SIDE:
        raise ValueError(f"{name} must be in [1, {_MAX_SIDE}], got {side}")
    return side
