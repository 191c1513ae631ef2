"""Label Studio brush RLE, vectorised with numpy.

Label Studio stores a brush mask as the RGBA image of shape (H, W, 4), flattened to
H*W*4 byte values and packed with thi.ng's ``rle-pack`` into a big-endian bit stream
that is then split into bytes (a JSON list of ints 0..255):

header, 53 bits
    32 bits  number of values (H*W*4)
     5 bits  word size - 1 (values are ``word size`` bits wide; 8 here)
    4x4 bits run-length field widths - 1 (the SDK and the LS frontend use 3, 4, 8, 16)
tokens, until ``number of values`` values have been produced
     1 bit   1 = repeat (one value, repeated n times), 0 = literal (n values follow)
     2 bits  index i into the four field widths
     w_i     n - 1
     value   one word (repeat) or n words (literal)
padding     zero bits up to the next byte boundary; the SDK always adds 1..8 bits, so
            a stream ending on a byte boundary gets a whole extra zero byte.

``mask_to_rle`` reproduces ``label_studio_sdk.converter.brush.mask2rle(mask * 255)``
byte for byte: every channel of a pixel holds 0 or 255, each run of equal values
becomes repeat tokens (a run of n values uses the narrowest field that holds n - 1;
runs longer than 256 use the 16-bit field, split into chunks of 65536).
``band_to_rle`` gives the same bytes for a mask that is background outside a band of
rows, at a cost proportional to the band (for masks handed over cropped to their rows).
Both share ``_encode_runs``.
``rle_to_mask`` decodes any valid stream (including the literal tokens the LS frontend
writes) and returns the alpha channel as a bool mask.
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["band_to_rle", "mask_to_rle", "rle_to_mask"]

_HEADER_BITS = 53
_WORD_BITS = 8
_FIELD_WIDTHS = np.array([3, 4, 8, 16], dtype=np.int64)
# Largest run (in values) each field holds but the last: 2**3, 2**4, 2**8.
_FIELD_LIMITS = np.array([8, 16, 256], dtype=np.int64)
# Word size and the four field widths, each stored minus one: 5 + 4 * 4 = 21 bits.
_HEADER_TAIL = (_WORD_BITS - 1) << 16 | (3 - 1) << 12 | (4 - 1) << 8 | (8 - 1) << 4 | (16 - 1)
_MAX_CHUNK = 1 << 16
_ONE = np.uint64(1)
_BIT_SHIFTS = np.arange(8, dtype=np.uint64)
# Bit positions scanned per pass of the decoder; bounds its memory (8 bytes per
# position per pointer-jumping level, up to ~16 levels) on multi-megabyte streams.
_DECODE_WINDOW = 1 << 18


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a (H, W) mask as Label Studio brush RLE.

    ``mask``: 2-D array of shape (H, W), bool or numeric; nonzero (NaN included)
    is foreground. Returns a list of ints in 0..255, identical to
    ``brush.mask2rle((mask != 0).astype(np.uint8) * 255)``.
    """
    arr = _foreground(mask, "mask")
    if arr.size == 0:
        raise ValueError(f"mask has no pixels (shape {arr.shape}); height and width must be >= 1")
    _check_value_count(arr.size, f"mask of shape {arr.shape}")
    flat = arr.ravel()
    return _encode_runs(_change_points(flat), bool(flat[0]), flat.size)


def band_to_rle(band: np.ndarray, top: int, height: int) -> list[int]:
    """Encode a (height, W) mask that is background outside rows [top, top + h).

    ``band``: 2-D array of shape (h, W), bool or numeric (nonzero is foreground),
    holding rows ``top .. top + h - 1`` of the full mask; ``h`` may be 0 (an empty
    mask). ``top``: the band's first row in the full mask's frame, ``0 <= top`` and
    ``top + h <= height``. ``height``: the full mask's row count (the image height).
    The full mask's width is the band's width ``W`` (>= 1).

    Returns the same list as ``mask_to_rle(full)``, where ``full`` is the
    (height, W) mask with ``full[top:top + h] = band`` and False elsewhere, but the
    cost grows with the band's pixels and the number of runs only: the run
    boundaries are found inside the band and shifted by ``top * W``; the background
    above and below the band is just the first and the last run.
    """
    arr = _foreground(band, "band")
    h, w = arr.shape
    if w < 1:
        raise ValueError(f"band has width {w} (shape {arr.shape}); the mask width must be >= 1")
    top = int_at_least(top, "top", minimum=0)
    height = int_at_least(height, "height", minimum=1)
    if top + h > height:
        raise ValueError(
            f"band rows [{top}, {top + h}) (top={top}, {h} rows) do not fit in a mask of "
            f"height {height}; need top + band.shape[0] <= height"
        )
    n = height * w
    _check_value_count(n, f"mask of shape ({height}, {w})")
    if h == 0:
        return _encode_runs(np.zeros(0, dtype=np.int64), False, n)
    # Boundaries in the band's frame, with background on both sides of the band:
    # 0 if its first pixel is set, h*w if its last pixel is set.
    starts = _change_points(arr.ravel(), edges=True) + top * w
    first_on = False
    if starts.size and starts[0] == 0:  # band starts at row 0 with foreground
        starts, first_on = starts[1:], True
    if starts.size and starts[-1] == n:  # band ends at the last row with foreground
        starts = starts[:-1]
    return _encode_runs(starts, first_on, n)


def _encode_runs(run_starts: np.ndarray, first_on: bool, n: int) -> list[int]:
    """The RLE bytes of an ``n``-pixel flat mask given by its run boundaries.

    ``run_starts``: sorted int64 pixel indices in (0, n) where the value changes
    (the start of every run but the first); ``first_on``: whether pixel 0 is
    foreground. Runs alternate between background and foreground.
    """
    run_values = np.diff(np.concatenate(([0], run_starts, [n]))) * 4  # 4 channels per pixel
    # The narrowest field that holds n - 1 for a run of n values: 3 bits up to 8,
    # 4 up to 16, 8 up to 256, else 16. Runs over 65536 values are split into full
    # 65536-value chunks followed by the remainder, all in the 16-bit field (even a
    # small remainder, as the SDK does). Every run covers a multiple of 4 values, so
    # the SDK's special case for a run of one value (a literal token) never occurs.
    field = np.searchsorted(_FIELD_LIMITS, run_values)
    width = _FIELD_WIDTHS[field]
    # Runs alternate between background and foreground, starting with pixel 0.
    colour = ((np.arange(run_values.size) + int(first_on)) & 1) * 255
    # Repeat flag, field index, (n - 1 left as zeros), the repeated value.
    head = ((4 | field) << width << _WORD_BITS) | colour
    if run_values.max() > _MAX_CHUNK:
        chunks = (run_values - 1) // _MAX_CHUNK + 1
        head, width = np.repeat(head, chunks), np.repeat(width, chunks)
        length = np.full(head.size, _MAX_CHUNK, dtype=np.int64)
        length[np.cumsum(chunks) - 1] = run_values - (chunks - 1) * _MAX_CHUNK
    else:
        length = run_values
    code = head | ((length - 1) << _WORD_BITS)
    codes = np.concatenate(([n * 4, _HEADER_TAIL], code))
    bits = np.concatenate(([32, 21], 3 + width + _WORD_BITS))
    return _pack(codes, bits).tolist()


def rle_to_mask(rle: list[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE into a bool mask of shape (height, width).

    ``rle``: list / 1-D array of ints in 0..255 (or ``bytes``), as stored in a
    ``brushlabels`` result. Foreground is a nonzero alpha channel (the channel LS
    draws with; the SDK's ``decode_from_annotation`` reads the same one).
    Raises ValueError if the stream's header does not promise exactly
    height*width*4 values or the stream ends before producing them.
    """
    data = _as_bytes(rle)
    h, w = int_at_least(height, "height", minimum=1), int_at_least(width, "width", minimum=1)
    expected = h * w * 4
    if data.size * 8 < _HEADER_BITS:
        raise ValueError(
            f"RLE is {data.size} bytes, shorter than its 7-byte header; "
            "pass the full 'rle' list of the brush result"
        )
    words = _byte_words(data)
    num = int(_read(words, 0, 32))
    if num != expected:
        raise ValueError(
            f"RLE holds {num} values ({num / 4:g} RGBA pixels) but height*width*4 = "
            f"{expected} ({h}x{w}); pass the original_height/original_width of the "
            "image the brush result belongs to"
        )
    word_bits = int(_read(words, 32, 5)) + 1
    widths = np.array([_read(words, 37 + 4 * i, 4) + 1 for i in range(4)], dtype=np.int64)

    pos, hdr, count, literal = _tokens(words, data.size * 8, word_bits, widths, num)
    # Only the alpha channel is needed: value 4*i + 3 for pixel i. A token covering
    # values [first, end) holds end//4 - first//4 of them. Like the SDK and the JS
    # decoder, let the final token overshoot the end and clip it.
    end = np.minimum(np.cumsum(count), num)
    first = np.concatenate(([0], end[:-1]))
    pixels = end // 4 - first // 4
    # A repeat token is one segment of `pixels` pixels; a literal token is `pixels`
    # one-pixel segments, read from its alpha values only.
    segs = np.where(literal, pixels, 1)
    seg_tok = np.repeat(np.arange(pos.size), segs)
    nth = np.arange(seg_tok.size) - np.repeat(np.cumsum(segs) - segs, segs)
    alpha_at = np.where(literal[seg_tok], (3 - first[seg_tok]) % 4 + 4 * nth, 0)
    values = _read(words, pos[seg_tok] + hdr[seg_tok] + alpha_at * word_bits, word_bits)
    seg_pixels = np.where(literal[seg_tok], 1, pixels[seg_tok])
    return np.repeat(values != 0, seg_pixels).reshape(h, w)


def _foreground(mask, name: str) -> np.ndarray:
    """``mask`` as a 2-D bool array (nonzero is foreground); checks dtype and rank."""
    arr = np.asarray(mask)
    if arr.dtype != bool and not (
        np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise TypeError(
            f"{name} must be a bool or real numeric array, got dtype {arr.dtype}; "
            f"convert it with {name}.astype(bool)"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (rows, width), got shape {arr.shape}; "
            f"for a multi-channel image pick one channel first, e.g. {name}[..., 0]"
        )
    return arr if arr.dtype == bool else arr != 0


def _check_value_count(pixels: int, what: str) -> None:
    if pixels * 4 >= 1 << 32:
        raise ValueError(
            f"{what} has too many pixels for the 32-bit value count "
            "(at most 2**30 - 1 pixels)"
        )


def int_at_least(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (numpy ints accepted, bool and float not)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if index < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {index}")
    return index


def _change_points(flat: np.ndarray, edges: bool = False) -> np.ndarray:
    """Sorted indices i with flat[i] != flat[i - 1], for a 1-D bool array of n >= 1.

    ``edges=False``: 0 < i < n, i.e. ``np.flatnonzero(flat[1:] != flat[:-1]) + 1``.
    ``edges=True``: as if background pixels surrounded ``flat``, so 0 is included
    when ``flat[0]`` is set and n when ``flat[-1]`` is set.

    About twice as fast as the ``flatnonzero`` form on real masks: the comparison
    runs on bit-packed 64-pixel words, so only the few words that contain a change
    are looked at bit by bit.
    """
    n = flat.size
    # At least one zero bit of padding after the last pixel, so a set last pixel
    # always shows up as a change at n.
    packed = np.zeros((n // 64 + 1) * 8, dtype=np.uint8)
    packed[: -(-n // 8)] = np.packbits(flat, bitorder="little")
    word = packed.view("<u8").astype(np.uint64)  # bit j of word q is pixel 64*q + j
    carry = np.empty_like(word)  # bit 0: the last pixel of the previous word
    carry[0] = 0 if edges else word[0] & _ONE
    np.right_shift(word[:-1], np.uint64(63), out=carry[1:])
    change = word ^ ((word << _ONE) | carry)
    where = np.flatnonzero(change != 0)
    change = change[where]
    count = np.bitwise_count(change)
    slot = np.cumsum(count) - count  # output index of each word's first change
    out = np.empty(int(count.sum()), dtype=np.int64)
    # Peel off the lowest set bit of every word at once: at most 64 rounds, and as
    # many as the busiest word has changes (one or two for typical masks).
    while where.size:
        out[slot] = where * 64 + np.bitwise_count(change ^ (change - _ONE)) - 1
        change &= change - _ONE
        left = change != 0
        where, change, slot = where[left], change[left], slot[left] + 1
    if not edges and out.size and out[-1] == n:
        return out[:-1]
    return out


def _pack(codes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Concatenate codes (each ``bits`` wide, at most 32, MSB first) into bytes.

    Pads with 1..8 zero bits, as the SDK does. Relies on every code being at least
    8 bits wide (tokens are 14..27), so no two codes start in the same byte and each
    of the five byte lanes below can be written with plain indexing.
    """
    offset = np.cumsum(bits) - bits
    total = int(offset[-1] + bits[-1])
    first = offset >> 3
    # Left-align each code in a 64-bit word at its bit offset within its first byte;
    # 32 bits + 7 bits of offset span at most five bytes.
    aligned = codes.astype(np.uint64) << (64 - bits - (offset & 7)).astype(np.uint64)
    out = np.zeros(total // 8 + 1 + 5, dtype=np.uint8)
    for lane in range(5):
        out[first + lane] |= (aligned >> np.uint64(56 - 8 * lane)).astype(np.uint8)
    return out[: total // 8 + 1]


def _as_bytes(rle) -> np.ndarray:
    if isinstance(rle, (bytes, bytearray, memoryview)):
        return np.frombuffer(rle, dtype=np.uint8)
    if isinstance(rle, list):
        try:  # bytes() range-checks in C, several times faster than np.asarray
            return np.frombuffer(bytes(rle), dtype=np.uint8)
        except (TypeError, ValueError):
            pass  # fall through for a precise error message
    arr = np.asarray(rle)
    if arr.ndim != 1:
        raise ValueError(f"rle must be a flat list of ints 0..255, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"rle must hold ints 0..255, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(
            f"rle values must be bytes (0..255), got range {arr.min()}..{arr.max()}; "
            "pass the 'rle' list of a brushlabels result"
        )
    return arr.astype(np.uint8)


def _byte_words(data: np.ndarray) -> np.ndarray:
    """Big-endian uint64 starting at each byte of ``data`` (zero-padded past the end)."""
    n = data.size + 8
    padded = np.zeros(n + 8, dtype=np.uint64)
    padded[: data.size] = data
    words = np.zeros(n, dtype=np.uint64)
    for k in range(8):
        words |= padded[k : k + n] << np.uint64(56 - 8 * k)
    return words


def _read(words: np.ndarray, pos, width) -> np.ndarray:
    """The ``width``-bit (1..32) unsigned field starting at bit ``pos`` (arrays ok)."""
    pos = np.asarray(pos, dtype=np.int64)
    w = words[pos >> 3] << (pos & 7).astype(np.uint64)
    return (w >> (64 - np.asarray(width, dtype=np.int64)).astype(np.uint64)).astype(np.int64)


def _tokens(words, nbits, word_bits, widths, num):
    """Find the tokens that produce the first ``num`` values.

    Returns, per token: bit position, header bits (flag + index + length field),
    value count n, and whether it is a literal. A token's length depends only on the
    bits where it starts, so the length is computed for *every* bit position at once;
    the real tokens are the chain start -> start + length -> ..., which is followed by
    pointer jumping (log2(tokens) vectorised passes) instead of a Python loop.
    """
    found, produced, start = [], 0, _HEADER_BITS
    while start < nbits and produced < num:
        stop = min(start + _DECODE_WINDOW, nbits)
        # The 19 bits (flag, index, up to a 16-bit length field) at every bit position:
        # each byte's 64-bit word shifted left by 0..7.
        first = start >> 3
        head = (words[first : (stop + 7) >> 3, None] << _BIT_SHIFTS) >> np.uint64(45)
        head = head.astype(np.int64).ravel()[start - 8 * first : stop - 8 * first]
        literal = head < (1 << 18)
        width = widths[(head >> 16) & 3]
        count = ((head >> (16 - width)) & ((1 << width) - 1)) + 1
        hdr = 3 + width
        local_next = np.arange(head.size) + hdr + word_bits * np.where(literal, count, 1)
        chain = _chain(np.minimum(local_next, head.size))
        nxt = start + local_next[chain]
        found.append((start + chain, hdr[chain], count[chain], literal[chain], nxt))
        produced += int(count[chain].sum())
        start = int(nxt[-1])
    pos, hdr, count, literal, nxt = (np.concatenate(f) for f in zip(*found))
    done = np.cumsum(count)
    if done[-1] < num:
        raise ValueError(
            f"RLE is truncated: it decodes to {int(done[-1])} values but its header promises "
            f"{num} (height*width*4); the list was probably cut short"
        )
    last = int(np.searchsorted(done, num))
    if nxt[last] > nbits:
        raise ValueError(
            f"RLE is truncated: its last token needs {int(nxt[last])} bits but only "
            f"{nbits} are present; the list was probably cut short"
        )
    keep = slice(0, last + 1)
    return pos[keep], hdr[keep], count[keep], literal[keep]


def _chain(nxt: np.ndarray) -> np.ndarray:
    """Indices 0, nxt[0], nxt[nxt[0]], ... below ``len(nxt)`` (``nxt`` strictly grows).

    Values >= len(nxt) leave the window; they all map to one absorbing sink.
    """
    sink = nxt.size
    jump = [np.append(nxt, sink)]  # jump[k][i]: where 2**k steps from i land
    while jump[-1][0] != sink:
        jump.append(jump[-1][jump[-1]])
    reached = np.zeros(1, dtype=np.int64)  # 0 plus multiples of 2**k steps, then k -= 1
    for step in reversed(jump[:-1]):
        reached = np.concatenate((reached, step[reached]))
    return np.unique(reached[reached != sink])
