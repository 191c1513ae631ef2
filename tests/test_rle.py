"""backend.rle against the Label Studio SDK's brush RLE (the reference format)."""

import numpy as np
import pytest
from label_studio_sdk.converter import brush

import backend.rle as rle
from backend.rle import mask_to_rle, rle_to_mask


def _ellipses(h, w, shapes):
    yy, xx = np.ogrid[:h, :w]
    mask = np.zeros((h, w), dtype=bool)
    for cy, cx, ry, rx in shapes:
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


def _one_pixel(h, w, y, x):
    mask = np.zeros((h, w), dtype=bool)
    mask[y, x] = True
    return mask


def _runs(lengths, start=False):
    """A 1 x sum(lengths) mask of alternating runs with the given pixel lengths."""
    values = (np.arange(len(lengths)) + start) % 2 == 1
    return np.repeat(values, lengths)[None, :]


def _noise(shape, density, seed):
    return np.random.default_rng(seed).random(shape) < density


# Pixel runs of 1..5, 63..65, 16383..16385 and 32768/32769 put the value runs (x4) on
# both sides of every field-width limit (8, 16, 256) and of the 65536-value chunking.
_FIELD_LIMITS = [1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32768, 32769, 1]

MASKS = {
    "empty": np.zeros((48, 64), dtype=bool),
    "full": np.ones((48, 64), dtype=bool),
    "full_multi_chunk": np.ones((300, 300), dtype=bool),  # 360000 values > 65536
    "pixel_top_left": _one_pixel(50, 60, 0, 0),
    "pixel_bottom_right": _one_pixel(50, 60, 49, 59),
    "pixel_middle": _one_pixel(51, 61, 25, 30),
    "1x1_off": np.zeros((1, 1), dtype=bool),
    "1x1_on": np.ones((1, 1), dtype=bool),
    "1xN": _noise((1, 1000), 0.3, 1),
    "Nx1": _noise((1000, 1), 0.3, 2),
    "7x13": _noise((7, 13), 0.5, 3),
    "301x199": _ellipses(301, 199, [(150, 100, 120, 70), (40, 30, 25, 60)]),
    "hline": np.pad(np.ones((1, 180), dtype=bool), ((60, 59), (10, 10))),
    "vline": np.pad(np.ones((180, 1), dtype=bool), ((10, 10), (60, 59))),
    "diagonal": np.eye(157, 211, k=3, dtype=bool),
    "checkerboard": np.indices((64, 64)).sum(axis=0) % 2 == 0,
    "checkerboard_odd": np.indices((33, 17)).sum(axis=0) % 2 == 1,
    "noise_1pct": _noise((120, 160), 0.01, 4),
    "noise_10pct": _noise((120, 160), 0.10, 5),
    "noise_50pct": _noise((120, 160), 0.50, 6),
    "noise_90pct": _noise((120, 160), 0.90, 7),
    "noise_99pct": _noise((120, 160), 0.99, 8),
    "field_limits_bg_first": _runs(_FIELD_LIMITS),
    "field_limits_fg_first": _runs(_FIELD_LIMITS, start=True),
    "ellipses_1080p": _ellipses(
        1080, 1920, [(300, 500, 200, 350), (700, 1300, 250, 400), (540, 960, 100, 100)]
    ),
    "ellipses_4000x3000": _ellipses(
        4000, 3000, [(1000, 800, 700, 500), (2800, 2000, 900, 800), (3900, 100, 300, 300)]
    ),
}


def _sdk_encode(mask):
    return brush.mask2rle((mask != 0).astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def sdk_rle():
    """The SDK's encoding of every mask, computed once (it is slow on large masks)."""
    return {name: _sdk_encode(mask) for name, mask in MASKS.items()}


@pytest.mark.parametrize("name", MASKS)
def test_encode_matches_sdk(name, sdk_rle):
    ours = mask_to_rle(MASKS[name])
    assert isinstance(ours, list) and all(type(v) is int for v in ours[:20])
    assert ours == sdk_rle[name]


@pytest.mark.parametrize("name", MASKS)
def test_round_trip(name):
    mask = MASKS[name]
    decoded = rle_to_mask(mask_to_rle(mask), *mask.shape)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("name", MASKS)
def test_decodes_sdk_output(name, sdk_rle):
    np.testing.assert_array_equal(rle_to_mask(sdk_rle[name], *MASKS[name].shape), MASKS[name])


@pytest.mark.parametrize("name", ["pixel_middle", "checkerboard_odd", "noise_50pct", "301x199"])
def test_decode_matches_sdk_decoder(name, sdk_rle):
    h, w = MASKS[name].shape
    alpha = brush.decode_rle(sdk_rle[name]).reshape(h, w, 4)[:, :, 3]
    np.testing.assert_array_equal(rle_to_mask(sdk_rle[name], h, w), alpha != 0)


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[0, 1, 7], [255, 0, 0]], dtype=np.uint8),
        np.array([[0.0, 0.5, -1.0], [0.0, 0.0, 3.0]]),
        np.array([[0, 2**40], [-3, 0]], dtype=np.int64),
        _noise((40, 30), 0.4, 9).T,  # non-contiguous view
        _noise((40, 30), 0.4, 10)[::3, 1::2],
    ],
    ids=["uint8", "float", "int64", "transposed", "strided"],
)
def test_numeric_and_non_contiguous_masks(mask):
    ours = mask_to_rle(mask)
    assert ours == _sdk_encode(mask)
    np.testing.assert_array_equal(rle_to_mask(ours, *mask.shape), mask != 0)


def test_rle_input_types():
    mask = MASKS["301x199"]
    encoded = mask_to_rle(mask)
    for rle_input in (encoded, np.array(encoded, dtype=np.uint8), np.array(encoded), bytes(encoded)):
        np.testing.assert_array_equal(rle_to_mask(rle_input, 301, 199), mask)
    np.testing.assert_array_equal(rle_to_mask(encoded, np.int64(301), np.int32(199)), mask)


# --- streams the SDK's mask2rle never writes (literal blocks, other field widths) ---


def _pack_stream(num, word_bits, widths, tokens):
    """Bit-pack (is_repeat, field_index, values) tokens with a plain-Python packer."""
    bits = f"{num:032b}{word_bits - 1:05b}" + "".join(f"{w - 1:04b}" for w in widths)
    for repeat, index, count, values in tokens:
        bits += f"{int(repeat)}{index:02b}{count - 1:0{widths[index]}b}"
        bits += "".join(f"{v:0{word_bits}b}" for v in values)
    bits += "0" * (8 - len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def _rgba_tokens(rgba, widths, seed):
    """Encode flat RGBA values with a random mix of repeat and literal tokens."""
    rng = np.random.default_rng(seed)
    tokens, i = [], 0
    while i < rgba.size:
        index = int(rng.integers(4))
        run = 1
        while i + run < rgba.size and rgba[i + run] == rgba[i] and run < 2 ** widths[index]:
            run += 1
        if run > 1:
            tokens.append((True, index, run, [int(rgba[i])]))
        else:
            count = int(min(rng.integers(1, 2 ** widths[index] + 1), rgba.size - i))
            tokens.append((False, index, count, [int(v) for v in rgba[i : i + count]]))
            run = count
        i += run
    return tokens


def _frontend_like(h, w, seed):
    """An RGBA brush layer like the LS frontend's: coloured strokes, alpha 0 or 255."""
    rng = np.random.default_rng(seed)
    alpha = _ellipses(h, w, [(h / 2, w / 3, h / 3, w / 4)]) | (rng.random((h, w)) < 0.05)
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[alpha] = [255, 0, 60, 255]
    return rgba, alpha


@pytest.mark.parametrize("widths", [(3, 4, 8, 16), (1, 2, 5, 12), (16, 1, 3, 7)])
def test_decodes_literal_blocks_and_other_field_widths(widths):
    rgba, alpha = _frontend_like(37, 53, seed=sum(widths))
    stream = _pack_stream(rgba.size, 8, widths, _rgba_tokens(rgba.ravel(), widths, seed=1))
    np.testing.assert_array_equal(brush.decode_rle(stream), rgba.ravel())  # packer sanity
    np.testing.assert_array_equal(rle_to_mask(stream, 37, 53), alpha)


def test_decodes_single_value_literals_from_sdk_encode_rle():
    # encode_rle writes a lone value as a 1-value literal token.
    rgba, alpha = _frontend_like(29, 41, seed=3)
    np.testing.assert_array_equal(rle_to_mask(brush.encode_rle(rgba.ravel()), 29, 41), alpha)


def test_decodes_other_word_size():
    alpha = _noise((21, 17), 0.5, 11)
    values = np.repeat(alpha.ravel().astype(np.uint8), 4)  # 1-bit words
    stream = _pack_stream(values.size, 1, (3, 4, 8, 16), _rgba_tokens(values, (3, 4, 8, 16), 2))
    np.testing.assert_array_equal(brush.decode_rle(stream), values)
    np.testing.assert_array_equal(rle_to_mask(stream, 21, 17), alpha)


@pytest.mark.parametrize(
    "name", ["noise_50pct", "checkerboard", "field_limits_fg_first", "ellipses_1080p"]
)
def test_decode_across_windows(name, monkeypatch):
    # A tiny window makes the decoder stitch many passes, with tokens spanning them.
    mask = MASKS[name]
    encoded = mask_to_rle(mask)
    monkeypatch.setattr(rle, "_DECODE_WINDOW", 61)
    np.testing.assert_array_equal(rle_to_mask(encoded, *mask.shape), mask)


def test_decode_literal_blocks_across_windows(monkeypatch):
    rgba, alpha = _frontend_like(31, 47, seed=5)
    widths = (3, 4, 8, 16)
    stream = _pack_stream(rgba.size, 8, widths, _rgba_tokens(rgba.ravel(), widths, seed=4))
    monkeypatch.setattr(rle, "_DECODE_WINDOW", 50)
    np.testing.assert_array_equal(rle_to_mask(stream, 31, 47), alpha)


def test_last_run_may_overshoot_like_the_sdk_decoder():
    # A final repeat covering more values than the header promises is clipped.
    stream = _pack_stream(8, 8, (3, 4, 8, 16), [(True, 1, 16, [255])])
    np.testing.assert_array_equal(rle_to_mask(stream, 1, 2), [[True, True]])


# --- bad input ---


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.zeros((4, 5, 3), dtype=bool), "2-D"),
        (np.zeros(20, dtype=bool), "2-D"),
        (np.zeros((0, 5), dtype=bool), "no pixels"),
    ],
)
def test_encode_rejects_bad_shape(mask, match):
    with pytest.raises(ValueError, match=match):
        mask_to_rle(mask)


@pytest.mark.parametrize(
    "mask", [np.array([["a", "b"]]), np.array([[1j, 0]]), np.array([[None, 1]], dtype=object)]
)
def test_encode_rejects_bad_dtype(mask):
    with pytest.raises(TypeError, match="bool or real numeric"):
        mask_to_rle(mask)


def test_decode_rejects_wrong_size():
    encoded = mask_to_rle(MASKS["301x199"])
    with pytest.raises(ValueError, match=r"height\*width\*4"):
        rle_to_mask(encoded, 300, 199)
    with pytest.raises(ValueError, match=r"height\*width\*4"):
        rle_to_mask(encoded, 301, 200)


def test_decode_rejects_truncated_stream():
    encoded = mask_to_rle(MASKS["noise_10pct"])
    # Two or more bytes: the last one may be nothing but padding.
    for cut in (2, 5, len(encoded) // 2, len(encoded) - 8):
        with pytest.raises(ValueError, match="truncated"):
            rle_to_mask(encoded[:-cut], 120, 160)
    with pytest.raises(ValueError, match="header"):
        rle_to_mask(encoded[:6], 120, 160)
    with pytest.raises(ValueError, match="header"):
        rle_to_mask([], 120, 160)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([0, 0, 1, 256], ValueError, "0..255"),
        ([0, -1], ValueError, "0..255"),
        ([0.5, 1.0], TypeError, "ints"),
        ([[0, 1], [2, 3]], ValueError, "flat"),
        ("abc", ValueError, "flat"),
    ],
)
def test_decode_rejects_bad_rle_values(bad, error, match):
    with pytest.raises(error, match=match):
        rle_to_mask(bad, 1, 1)


@pytest.mark.parametrize(
    "height, width, error",
    [(0, 5, ValueError), (-2, 5, ValueError), (5, 2.5, TypeError), ("5", 5, TypeError), (True, 5, TypeError)],
)
def test_decode_rejects_bad_dimensions(height, width, error):
    with pytest.raises(error, match="height|width"):
        rle_to_mask(mask_to_rle(np.ones((5, 5), dtype=bool)), height, width)
