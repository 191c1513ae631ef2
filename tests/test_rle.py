"""backend.rle against the Label Studio SDK's brush RLE (the reference format)."""

import numpy as np
import pytest
from label_studio_sdk.converter import brush

import backend.rle as rle
from backend.rle import band_to_rle, mask_to_rle, rle_to_mask


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


# --- band_to_rle: a mask that is background outside rows [top, top + h) ---


def _full(band, top, height):
    """The (height, W) mask that ``band`` at row ``top`` stands for."""
    band = np.asarray(band)
    full = np.zeros((height, band.shape[1]), dtype=bool)
    full[top : top + band.shape[0]] = band != 0
    return full


def _row_span(mask):
    """(first, last + 1) of the rows holding foreground, (0, 0) if none."""
    rows = np.flatnonzero(mask.any(axis=1))
    return (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)


@pytest.mark.parametrize("name", MASKS)
def test_band_of_foreground_rows_matches_sdk(name, sdk_rle):
    mask = MASKS[name]
    height = mask.shape[0]
    first, stop = _row_span(mask)
    # The tight band, a band with background rows around it, and the whole mask.
    for top, bottom in ((first, stop), (max(first - 3, 0), min(stop + 2, height)), (0, height)):
        assert band_to_rle(mask[top:bottom], top, height) == sdk_rle[name], (top, bottom)


def _random_band_case(rng):
    height, width = int(rng.integers(1, 41)), int(rng.integers(1, 41))
    h = int(rng.integers(0, height + 1))
    top = int(rng.integers(0, height - h + 1))
    density = rng.choice([0.0, 0.02, 0.3, 0.5, 0.9, 1.0])
    band = rng.random((h, width)) < density
    if h and rng.random() < 0.5:  # force foreground at the band's corners
        band[0, 0] = band[-1, -1] = True
    return band, top, height


@pytest.mark.parametrize("seed", range(8))
def test_random_bands_match_sdk_and_full_mask(seed):
    rng = np.random.default_rng(1000 + seed)
    for case in range(60):
        band, top, height = _random_band_case(rng)
        full = _full(band, top, height)
        expected = _sdk_encode(full)
        ours = band_to_rle(band, top, height)
        assert ours == expected, (seed, case, band.shape, top, height)
        assert ours == mask_to_rle(full)
        np.testing.assert_array_equal(rle_to_mask(ours, *full.shape), full)


def _rows(width, *rows):
    """A band whose rows are given as strings of '.' (background) and '#'."""
    band = np.array([[c == "#" for c in row] for row in rows], dtype=bool).reshape(-1, width)
    return band


BAND_CASES = {
    # name: (band, top, height)
    "empty_h0_top0": (np.zeros((0, 7), dtype=bool), 0, 5),
    "empty_h0_top_end": (np.zeros((0, 7), dtype=bool), 5, 5),
    "empty_h0_middle": (np.zeros((0, 1), dtype=bool), 2, 5),
    "all_background_band": (np.zeros((3, 9), dtype=bool), 2, 8),
    "top0_fg_first_pixel": (_rows(5, "#....", "....."), 0, 6),
    "top0_full_band": (np.ones((2, 5), dtype=bool), 0, 6),
    "last_row_fg_last_pixel": (_rows(5, ".....", "....#"), 4, 6),
    "last_row_full": (np.ones((2, 5), dtype=bool), 4, 6),
    "band_is_whole_mask_fg_corners": (_rows(4, "#..#", "....", "#..#"), 0, 3),
    "whole_mask_full": (np.ones((3, 4), dtype=bool), 0, 3),
    "fg_at_band_start_mid_mask": (_rows(6, "##....", "......"), 3, 9),
    "fg_at_band_end_mid_mask": (_rows(6, "......", "....##"), 3, 9),
    "fg_crosses_both_band_edges": (np.ones((2, 6), dtype=bool), 3, 9),
    "single_row_band": (_rows(8, ".##..#.#"), 4, 9),
    "single_pixel_mask_on": (np.ones((1, 1), dtype=bool), 0, 1),
    "single_pixel_mask_off": (np.zeros((1, 1), dtype=bool), 0, 1),
    "w1_middle": (np.array([[True], [False], [True]]), 3, 10),
    "w1_top": (np.array([[True], [True]]), 0, 10),
    "w1_bottom": (np.array([[False], [True]]), 8, 10),
    "w1_all": (np.ones((10, 1), dtype=bool), 0, 10),
    # Band sizes a multiple of the 64-pixel words, with foreground in the last pixel.
    "band_64_pixels_fg_last": (np.ones((1, 64), dtype=bool), 2, 5),
    "band_128_pixels_fg_edges": (
        np.pad(np.zeros((2, 62), dtype=bool), 1, constant_values=True),
        1,
        6,
    ),
    "band_64_pixels_at_end": (np.ones((2, 32), dtype=bool), 3, 5),
    # Runs of > 65536 values (16384 pixels) crossing the band's edges: 300 rows of
    # 300 foreground pixels (360000 values) between 30000-pixel background runs.
    "long_fg_run_across_band": (np.ones((300, 300), dtype=bool), 100, 500),
    "long_fg_run_with_hole": (
        np.pad(np.zeros((1, 1), dtype=bool), ((150, 149), (150, 149)), constant_values=True),
        100,
        500,
    ),
    "long_background_inside_band": (_full(np.ones((1, 300), dtype=bool), 0, 200)[::-1], 50, 400),
    "long_runs_from_top": (np.ones((100, 700), dtype=bool), 0, 300),
    "long_runs_to_bottom": (np.ones((100, 700), dtype=bool), 200, 300),
    # Value runs on both sides of the field-width limits (8, 16, 256, 65536).
    "field_limits_band": (_runs(_FIELD_LIMITS), 1, 3),
    "field_limits_band_fg_first": (_runs(_FIELD_LIMITS, start=True), 0, 2),
    "field_limits_band_at_end": (_runs(_FIELD_LIMITS, start=True), 1, 2),
    "ellipses_1080p_band": (MASKS["ellipses_1080p"][100:541], 100, 1080),
}


@pytest.mark.parametrize("name", BAND_CASES)
def test_band_edge_cases_match_sdk(name):
    band, top, height = BAND_CASES[name]
    full = _full(band, top, height)
    ours = band_to_rle(band, top, height)
    assert isinstance(ours, list) and all(type(v) is int for v in ours)
    assert ours == _sdk_encode(full)
    assert ours == mask_to_rle(full)
    np.testing.assert_array_equal(rle_to_mask(ours, *full.shape), full)


def test_empty_band_is_an_all_background_mask():
    for height, width in ((1, 1), (5, 7), (300, 300), (1080, 1920)):
        expected = mask_to_rle(np.zeros((height, width), dtype=bool))
        for top in (0, height // 2, height):
            assert band_to_rle(np.zeros((0, width), dtype=bool), top, height) == expected


@pytest.mark.parametrize(
    "band",
    [
        np.array([[0, 3, 0], [255, 0, 0]], dtype=np.uint8),
        np.array([[0.0, -0.5, 0.0], [0.0, 0.0, np.nan]]),
        np.array([[0, 2**40, 0], [0, 0, -1]], dtype=np.int64),
        _noise((9, 12), 0.4, 21).T,  # non-contiguous view
        _noise((30, 40), 0.4, 22)[5:20:2, ::3],
    ],
    ids=["uint8", "float_nan", "int64", "transposed", "strided"],
)
def test_band_numeric_and_non_contiguous(band):
    full = _full(band, 4, 20)
    assert band_to_rle(band, 4, 20) == _sdk_encode(full)
    assert band_to_rle(band, np.int64(4), np.int32(20)) == _sdk_encode(full)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((np.zeros(5, dtype=bool), 0, 5), ValueError, "2-D"),
        ((np.zeros((2, 3, 4), dtype=bool), 0, 5), ValueError, "2-D"),
        ((np.zeros((2, 0), dtype=bool), 0, 5), ValueError, "width"),
        ((np.zeros((0, 0), dtype=bool), 0, 5), ValueError, "width"),
        ((np.array([["a", "b"]]), 0, 5), TypeError, "bool or real numeric"),
        ((np.array([[1j, 0]]), 0, 5), TypeError, "bool or real numeric"),
        ((np.zeros((2, 3), dtype=bool), -1, 5), ValueError, "top must be >= 0"),
        ((np.zeros((2, 3), dtype=bool), 4, 5), ValueError, r"rows \[4, 6\).*height 5"),
        ((np.zeros((6, 3), dtype=bool), 0, 5), ValueError, r"rows \[0, 6\).*height 5"),
        ((np.zeros((0, 3), dtype=bool), 6, 5), ValueError, r"rows \[6, 6\).*height 5"),
        ((np.zeros((0, 3), dtype=bool), 0, 0), ValueError, "height must be >= 1"),
        ((np.zeros((2, 3), dtype=bool), 1.0, 5), TypeError, "top must be an int"),
        ((np.zeros((2, 3), dtype=bool), True, 5), TypeError, "top must be an int, got bool"),
        ((np.zeros((2, 3), dtype=bool), 0, "5"), TypeError, "height must be an int"),
        ((np.zeros((2, 3), dtype=bool), 0, 5.0), TypeError, "height must be an int"),
        ((np.zeros((0, 1 << 15), dtype=bool), 0, 1 << 15), ValueError, "too many pixels"),
    ],
)
def test_band_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        band_to_rle(*args)


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
