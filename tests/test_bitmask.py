"""Bitmask regions (``<BitmaskLabels>``): the PNG encoder (``backend/bitmask.py``), the config, the
regions, the ``outputs`` option, the EXIF-transposed frame, smart tools and the context.

The PNG must hold exactly what LS's own drawn bitmasks hold once decoded: RGBA (0, 0, 0, 255) on the
mask and (0, 0, 0, 0) elsewhere (LS 1.23.2, ``BitmaskRegion.getImageSnapshotCanvas``), at the
image's size; it is checked with Pillow, with libpng (OpenCV) and by inflating its IDAT with zlib,
which verifies the Adler-32 the encoder assembles, and against the brush RLE of the same mask.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from backend import bitmask
from backend.bitmask import crop_to_png, data_url_to_png, mask_to_png, png_data_url, png_to_mask
from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.options import OptionsError, PredictOptions
from backend.ls.regions import build_mask_prediction, build_prediction, compact_mask_png
from backend.ls.tasks import PredictRequest, asks_for_nothing
from backend.results import CompactMask, Detections, ImageResult, LabeledMasks, PromptedMask
from backend.rle import mask_to_rle, rle_to_mask
from tests.test_geometry import data_uri, exif_orientation, stub_pipeline, with_marker  # noqa: F401 (a fixture)
from tests.test_protocol import png

BITMASK_ONLY = """<View>
  <Image name="image" value="$image"/>
  <BitmaskLabels name="bm" toName="image">
    <Label value="cat"/><Label value="dog" predicted_values="puppy"/>
  </BitmaskLabels>
</View>"""

BRUSH_AND_BITMASK = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <BitmaskLabels name="bm" toName="image"><Label value="cat"/><Label value="bird"/></BitmaskLabels>
</View>"""

SMART_BITMASK = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
  <BitmaskLabels name="bm" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></BitmaskLabels>
</View>"""


# ------------------------------------------------------------------ helpers

def ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.ogrid[:height, :width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def random_masks(count: int, seed: int = 0):
    """Masks of every shape the encoder must cope with: specks, holes, empty, full, one row, at the borders."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((height, width)) < rng.random() * 0.6
        pick = rng.random()
        if pick < 0.15:
            mask[:] = False
        elif pick < 0.3:
            mask[:] = True
        elif pick < 0.6:  # a band of rows and columns, possibly touching the borders
            top, left = rng.integers(0, height), rng.integers(0, width)
            mask[:top] = False
            mask[:, :left] = False
        yield mask


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``[(type, data)]`` of a PNG, each chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(body, zlib.crc32(kind)), f"bad CRC on {kind}"
        out.append((kind, body))
        at += 12 + length
    return out


def ls_rgba(png_bytes: bytes) -> np.ndarray:
    """The RGBA a browser (and LS) decodes the PNG to."""
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGBA"))


def check_like_ls_draws(png_bytes: bytes, mask: np.ndarray) -> None:
    """The image's size; black and opaque on the mask, transparent (0, 0, 0, 0) elsewhere."""
    image = Image.open(io.BytesIO(png_bytes))
    assert image.format == "PNG" and image.mode == "LA" and image.size == (mask.shape[1], mask.shape[0])
    rgba = ls_rgba(png_bytes)
    assert (rgba[mask] == (0, 0, 0, 255)).all() and (rgba[~mask] == 0).all()


# ------------------------------------------------------------------ the encoder

def test_pixels_are_what_ls_draws_and_every_decoder_agrees():
    for mask in random_masks(300):
        data = mask_to_png(mask)
        check_like_ls_draws(data, mask)
        assert np.array_equal(png_to_mask(data, *mask.shape), mask)
        libpng = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # grey + alpha → BGRA
        assert libpng is not None and np.array_equal(libpng[..., 3] > 0, mask) and not libpng[..., :3].any()


def test_the_stream_is_a_valid_png_with_the_rows_of_the_mask():
    """IHDR says LA 8-bit at the mask's size; the IDAT inflates (zlib checks the Adler-32 the encoder
    assembled from the band's checksum and the zero runs) to filter-0 rows of (0, alpha) pixels."""
    for mask in random_masks(200, seed=1):
        height, width = mask.shape
        parts = chunks(mask_to_png(mask))
        assert [kind for kind, _ in parts] == [b"IHDR", b"IDAT", b"IEND"]
        assert parts[0][1] == struct.pack(">IIBBBBB", width, height, 8, 4, 0, 0, 0)
        rows = np.frombuffer(zlib.decompress(parts[1][1]), np.uint8).reshape(height, 1 + 2 * width)
        assert not rows[:, 0].any() and not rows[:, 1::2].any()
        assert np.array_equal(rows[:, 2::2], mask.astype(np.uint8) * 255)


def test_a_long_stream_is_split_into_idat_chunks_that_decoders_join(monkeypatch):
    monkeypatch.setattr(bitmask, "_MAX_CHUNK", 16)  # 2**30 bytes per IDAT chunk in real use
    mask = ellipse(40, 50, 20, 25, 12, 18)
    data = mask_to_png(mask)
    kinds = [kind for kind, _ in chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"} and len(kinds) > 4
    check_like_ls_draws(data, mask)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., 3] > 0, mask)


def test_round_trip_equals_the_brush_rle_of_the_same_mask():
    for mask in random_masks(100, seed=2):
        from_rle = rle_to_mask(mask_to_rle(mask), *mask.shape)
        assert np.array_equal(png_to_mask(mask_to_png(mask), *mask.shape), from_rle)


@pytest.mark.parametrize("height, width, crop_box", [
    (1080, 1920, (700, 100, 54, 600)),  # a small object: 54 of 1080 rows
    (97, 251, (0, 0, 97, 251)),  # the whole image
    (50, 40, (49, 39, 1, 1)),  # one pixel in the corner
    (64, 64, (0, 10, 1, 20)),  # the first row only
    (33, 17, (32, 0, 1, 17)),  # the last row only
])
def test_crop_at_any_place_gives_the_full_image(height, width, crop_box):
    top, left, h, w = crop_box
    rng = np.random.default_rng(h * w)
    crop = rng.random((h, w)) < 0.7
    full = np.zeros((height, width), bool)
    full[top:top + h, left:left + w] = crop
    data = crop_to_png(crop, top, left, height, width)
    check_like_ls_draws(data, full)
    assert np.array_equal(ls_rgba(data), ls_rgba(mask_to_png(full)))


def test_only_the_crop_rows_are_compressed_the_transparent_rows_come_from_the_cache(monkeypatch):
    """Band-wise like the RLE: per mask the deflate library sees the crop's rows and nothing else;
    the rows above and below are cached segments (powers of two of rows per width)."""
    fed = []
    real = bitmask._deflate.compressobj

    class Recording:
        def __init__(self, *args):
            self.inner = real(*args)

        def compress(self, data):
            fed.append(len(memoryview(data).cast("B")))
            return self.inner.compress(data)

        def flush(self, *args):
            return self.inner.flush(*args)

    height, width = 1080, 1920
    mask = CompactMask.from_full(ellipse(height, width, 700.5, 1100, 27, 300))
    compact_mask_png(mask)  # fills the cache for this width
    monkeypatch.setattr(bitmask._deflate, "compressobj", Recording)
    data = compact_mask_png(mask)
    assert fed == [mask.crop.shape[0] * (1 + 2 * width)], fed  # 54 rows, not 1080
    check_like_ls_draws(data, mask.full())


def test_zero_run_checksum_matches_zlibs():
    for value in (1, 0x12345678 % (65521 << 16), (65520 << 16) | 65520):
        for count in (0, 1, 3841, 65521, 65521 * 3 + 7, 10**7 + 3):
            assert bitmask._adler32_zeros(value, count) == zlib.adler32(bytes(count), value)


def test_the_standard_librarys_zlib_gives_the_same_pixels(monkeypatch):
    """Without python-isal the encoder falls back to zlib: other bytes, the same image."""
    mask = ellipse(120, 90, 60, 40, 30, 25) & ~ellipse(120, 90, 60, 40, 8, 6)
    fast = mask_to_png(mask)
    monkeypatch.setattr(bitmask, "_deflate", zlib)
    slow = mask_to_png(mask)
    assert slow != fast
    check_like_ls_draws(slow, mask)
    assert np.array_equal(ls_rgba(slow), ls_rgba(fast))


def test_an_empty_mask_is_a_transparent_image_of_the_full_size():
    data = mask_to_png(np.zeros((40, 30), bool))
    check_like_ls_draws(data, np.zeros((40, 30), bool))
    assert crop_to_png(np.zeros((0, 0), bool), 0, 0, 40, 30) == data


@pytest.mark.parametrize("args, error, message", [
    ((np.ones((3, 3), bool), 8, 0, 10, 10), ValueError, "do not fit"),
    ((np.ones((3, 3), bool), 0, 8, 10, 10), ValueError, "do not fit"),
    ((np.ones((3, 3), bool), -1, 0, 10, 10), ValueError, "top must be >= 0"),
    ((np.ones((3, 3), bool), 0, 0, 0, 10), ValueError, "height must be >= 1"),
    ((np.ones((3, 3), bool), 0.5, 0, 10, 10), TypeError, "top must be an int"),
    ((np.ones((3, 3, 2), bool), 0, 0, 10, 10), ValueError, "2-D"),
    ((np.array([["a"]]), 0, 0, 10, 10), TypeError, "bool or real numeric"),
])
def test_bad_input_says_what_is_wrong(args, error, message):
    with pytest.raises(error, match=message):
        crop_to_png(*args)


def test_decoding_checks_the_size_and_the_format():
    data = mask_to_png(np.eye(5, dtype=bool))
    with pytest.raises(ValueError, match="5x5, the image 6x5"):
        png_to_mask(data, 5, 6)
    with pytest.raises(ValueError, match="not a PNG"):
        png_to_mask(b"GIF89a" + data[6:])
    with pytest.raises(ValueError, match="must start with"):
        png_to_mask("data:image/jpeg;base64," + base64.b64encode(data).decode())
    with pytest.raises(ValueError, match="not valid base64"):
        png_to_mask("data:image/png;base64,@@@")
    assert data_url_to_png(png_data_url(data)) == data


def test_what_ls_itself_writes_decodes_to_its_alpha():
    """LS's drawn bitmasks are RGBA PNGs (black where drawn, anti-aliased edges of partial alpha):
    alpha > 0 is the region, as LS's hover and bounds read it. A PNG without alpha is opaque
    everywhere, which is how LS shows it."""
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[5:15, 10:20, 3] = 255
    rgba[4, 10:20, 3] = 40  # an anti-aliased edge
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    assert np.array_equal(png_to_mask(png_data_url(buffer.getvalue()), 20, 30), rgba[..., 3] > 0)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 30), np.uint8), "L").save(buffer, "PNG")
    assert png_to_mask(buffer.getvalue(), 20, 30).all()


# ------------------------------------------------------------------ the label config

def test_bitmask_labels_alone_are_a_usable_config():
    config = parse_label_config(BITMASK_ONLY)
    assert config.rectangle is None and config.brush is None and config.polygon is None
    assert (config.bitmask.name, config.bitmask.to_name, config.bitmask.labels) == ("bm", "image", ("cat", "dog"))
    assert config.labels == ("cat", "dog") and config.map_phrase("puppy") == "dog"


def test_bitmask_labels_beside_the_other_controls_and_on_another_image():
    config = parse_label_config(BRUSH_AND_BITMASK)
    assert (config.rectangle.name, config.brush.name, config.bitmask.name) == ("box", "mask", "bm")
    assert config.labels == ("cat", "dog", "bird")
    other = parse_label_config('<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
                               '<BrushLabels name="m" toName="a"><Label value="x"/></BrushLabels>'
                               '<BitmaskLabels name="bm" toName="b"><Label value="x"/></BitmaskLabels></View>')
    assert other.image_name == "a" and other.bitmask is None


def test_a_config_without_any_output_control_names_bitmask_labels_too():
    with pytest.raises(LabelConfigError, match="<BitmaskLabels>"):
        parse_label_config('<View><Image name="i" value="$image"/><Choices name="c" toName="i">'
                           '<Choice value="a"/></Choices></View>')
    with pytest.raises(LabelConfigError, match="no <Label> children"):
        parse_label_config('<View><Image name="i" value="$image"/><BitmaskLabels name="b" toName="i"/></View>')


# ------------------------------------------------------------------ regions

def detection_result(masks: list[np.ndarray], phrases: tuple[str, ...], scores=None) -> ImageResult:
    compact = tuple(CompactMask.from_full(m) for m in masks)
    boxes = np.stack([m.box() for m in compact]).astype(np.float32)
    scores = np.linspace(0.9, 0.5, len(masks)) if scores is None else scores
    height, width = masks[0].shape
    return ImageResult(width, height, Detections(boxes, np.asarray(scores, np.float32), phrases), compact)


def bitmask_regions(prediction: dict) -> list[dict]:
    return [r for r in prediction["result"] if r["type"] == "bitmasklabels"]


def check_bitmask_region(region: dict, label: str, height: int, width: int) -> np.ndarray:
    """LS's bitmasklabels shape (the stable interface); returns the decoded mask."""
    assert region["type"] == "bitmasklabels" and region["from_name"] == "bm" and region["to_name"] == "image"
    assert (region["original_width"], region["original_height"]) == (width, height)
    assert region["image_rotation"] == 0 and 0 <= region["score"] <= 1 and len(region["id"]) == 16
    value = region["value"]
    assert set(value) == {"imageDataURL", "bitmasklabels"} and value["bitmasklabels"] == [label]
    assert value["imageDataURL"].startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(data_url_to_png(value["imageDataURL"])))
    assert image.mode in ("LA", "RGBA") and image.size == (width, height)
    return png_to_mask(value["imageDataURL"], height, width)


def test_each_detection_yields_a_bitmask_equal_to_its_brush_mask():
    height, width = 90, 160
    masks = [ellipse(height, width, 40, 50, 30, 40) & ~ellipse(height, width, 40, 50, 8, 10),
             ellipse(height, width, 70, 120, 15, 30), ellipse(height, width, 10, 140, 9, 9)]
    prediction, stats = build_prediction(detection_result(masks, ("cat", "dog", "bird")),
                                         parse_label_config(BRUSH_AND_BITMASK), "v")
    kinds = sorted((r["type"], r["value"][r["type"]][0]) for r in prediction["result"])
    assert kinds == [("bitmasklabels", "bird"), ("bitmasklabels", "cat"), ("brushlabels", "cat"),
                     ("brushlabels", "dog"), ("rectanglelabels", "cat"), ("rectanglelabels", "dog")]
    assert stats.regions == 6
    for region in bitmask_regions(prediction):
        label = region["value"]["bitmasklabels"][0]
        expected = masks[("cat", "dog", "bird").index(label)]
        assert np.array_equal(check_bitmask_region(region, label, height, width), expected)
    brush = next(r for r in prediction["result"] if r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["cat"])
    cat = next(r for r in bitmask_regions(prediction) if r["value"]["bitmasklabels"] == ["cat"])
    assert np.array_equal(png_to_mask(cat["value"]["imageDataURL"], height, width),
                          rle_to_mask(brush["value"]["rle"], height, width))
    assert cat["score"] == brush["score"]


def test_thresholds_and_aliases_apply_to_the_bitmask_control():
    config = parse_label_config(BITMASK_ONLY.replace('toName="image">', 'toName="image" model_score_threshold="0.6">'))
    masks = [ellipse(40, 40, 20, 20, 9, 9), ellipse(40, 40, 10, 10, 5, 5)]
    prediction, stats = build_prediction(detection_result(masks, ("puppy", "cat"), scores=[0.7, 0.5]), config, "v")
    assert [r["value"]["bitmasklabels"] for r in prediction["result"]] == [["dog"]]
    assert sum(stats.dropped.values()) == 1


def test_an_empty_mask_yields_no_bitmask_region():
    height, width = 30, 40
    result = ImageResult(width, height, Detections(np.array([[1, 1, 5, 5]], np.float32), np.array([0.9], np.float32),
                                                   ("cat",)), (CompactMask.empty(height, width),))
    prediction, _ = build_prediction(result, parse_label_config(BRUSH_AND_BITMASK), "v")
    assert {r["type"] for r in prediction["result"]} == {"rectanglelabels", "brushlabels"}


@pytest.mark.parametrize("outputs, kinds", [
    (["bitmask"], {"bitmasklabels"}),
    (["brush"], {"brushlabels"}),
    (["rectangle", "bitmask"], {"rectanglelabels", "bitmasklabels"}),
    (None, {"rectanglelabels", "brushlabels", "bitmasklabels"}),
])
def test_the_outputs_option_picks_bitmask_like_any_kind(outputs, kinds):
    options = PredictOptions.from_json({"outputs": outputs} if outputs else None)
    assert options.to_json() == ({"outputs": outputs} if outputs else {})
    prediction, _ = build_prediction(detection_result([ellipse(50, 60, 25, 30, 10, 12)], ("cat",)),
                                     parse_label_config(BRUSH_AND_BITMASK), "v", options=options)
    assert {r["type"] for r in prediction["result"]} == kinds


def test_outputs_names_bitmask_among_the_kinds():
    with pytest.raises(OptionsError, match="'bitmask'"):
        PredictOptions.from_json({"outputs": ["bitmasks"]})


def test_smart_tool_masks_yield_bitmasks_with_their_label():
    mask = ellipse(48, 64, 20, 30, 12, 20)
    labeled = LabeledMasks(64, 48, (PromptedMask("dog", CompactMask.from_full(mask), 0.8),))
    prediction = build_mask_prediction(labeled, parse_label_config(SMART_BITMASK), "v")
    (region,) = prediction["result"]
    assert np.array_equal(check_bitmask_region(region, "dog", 48, 64), mask)


# ------------------------------------------------------------------ through the pipeline

def test_exif_rotated_jpeg_gives_a_png_of_the_displayed_size_on_the_marker(stub_pipeline):
    """Stored 400x300 with EXIF orientation 6: LS shows it 300x400, so the PNG is 300x400 and the
    mask sits on the marker where the viewer sees it, pixel for pixel what the brush RLE says."""
    pipeline, detector = stub_pipeline
    stored = with_marker(400, 300, (40, 30, 80, 90))
    url = data_uri(stored, "JPEG", quality=95, exif=exif_orientation(6))
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": url}}], config=parse_label_config(
        BRUSH_AND_BITMASK.replace('"bird"', '"marker"').replace('"dog"', '"marker"')), context=None)
    (prediction,) = pipeline.predict(request)
    assert detector.seen_sizes == [(300, 400)]
    region = bitmask_regions(prediction)[0]
    brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
    mask = check_bitmask_region(region, "marker", 400, 300)
    assert np.array_equal(mask, rle_to_mask(brush["value"]["rle"], 400, 300))
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - 210) <= 2 and abs(xs.max() + 1 - 270) <= 2
    assert abs(ys.min() - 40) <= 2 and abs(ys.max() + 1 - 80) <= 2


def click(label: str | None = "dog", x: float = 50, y: float = 50) -> dict:
    value = {"x": x, "y": y, "width": 0.5}
    if label:
        value["keypointlabels"] = [label]
    return {"id": "k", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": 96, "original_height": 64, "image_rotation": 0, "is_positive": True, "value": value}


def context_mask(kind: str, width: int = 96, height: int = 64) -> dict:
    """A mask region as LS sends it: a smart BitmaskLabels stroke (its RGBA PNG) or a brush (RLE)."""
    mask = ellipse(height, width, 30, 40, 10, 15)
    if kind == "bitmask":
        rgba = np.zeros((height, width, 4), np.uint8)
        rgba[mask, 3] = 255
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
        value = {"imageDataURL": png_data_url(buffer.getvalue()), "bitmasklabels": ["dog"]}
        return {"id": "b", "from_name": "bm", "to_name": "image", "type": "bitmasklabels", "origin": "manual",
                "original_width": width, "original_height": height, "image_rotation": 0, "value": value}
    return {"id": "r", "from_name": "mask", "to_name": "image", "type": "brushlabels", "origin": "manual",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["dog"]}}


SMART_BOTH = SMART_BITMASK.replace("</View>", '<BrushLabels name="mask" toName="image"><Label value="dog"/>'
                                              '</BrushLabels></View>')


@pytest.mark.parametrize("label", ["dog", None])
def test_a_click_in_a_bitmask_project_comes_back_as_a_bitmask(tiny_settings, label):
    """Smart tools with only BitmaskLabels to write to: the click's mask as a bitmask of its label (a
    click without one takes the bitmask control's first label)."""
    from backend.pipeline.predict import Pipeline

    image = "data:image/png;base64," + base64.b64encode(png(96, 64)).decode()
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": image}}], config=parse_label_config(SMART_BITMASK),
                             context={"result": [click(label)]})
    pipeline = Pipeline(tiny_settings)
    (prediction,) = pipeline.predict(request)
    (region,) = prediction["result"]
    assert check_bitmask_region(region, label or "cat", 64, 96).any()
    assert pipeline.metrics.registry.get_sample_value("gsam_regions_total", {"type": "bitmasklabels"}) == 1


@pytest.mark.parametrize("kind", ["bitmask", "brush"])
def test_a_mask_in_the_context_is_accepted_beside_clicks_as_a_brush_is(tiny_settings, kind):
    """The context may hold masks (a smart BitmaskLabels stroke sends its PNG): bitmask and brush
    alike are accepted and are not prompts, so the click is answered as without them, and a context
    with only a mask asks for nothing (no image fetched, no model run)."""
    from backend.pipeline.predict import Pipeline

    config = parse_label_config(SMART_BOTH)
    image = "data:image/png;base64," + base64.b64encode(png(96, 64)).decode()
    pipeline = Pipeline(tiny_settings)

    def ask(context):
        request = PredictRequest(tasks=[{"id": 1, "data": {"image": image}}], config=config, context=context)
        return request, pipeline.predict(request)[0]

    _, alone = ask({"result": [click()]})
    _, beside = ask({"result": [context_mask(kind), click()]})
    assert [(r["type"], r["value"][r["type"]]) for r in beside["result"]] == \
        [(r["type"], r["value"][r["type"]]) for r in alone["result"]]
    assert [r["value"].get("imageDataURL") for r in beside["result"]] == \
        [r["value"].get("imageDataURL") for r in alone["result"]]
    request, only = ask({"result": [context_mask(kind)]})
    assert asks_for_nothing(request) and only["result"] == []


# ------------------------------------------------------------------ the command line

def test_cli_writes_bitmasks_when_asked_and_its_overlay_tints_them():
    from backend.cli import _config_for_phrases, draw_overlay, parse_outputs
    from backend.cli_video import PALETTE

    assert parse_outputs("bitmask, rectangle") == ("rectangle", "bitmask")
    config = parse_label_config(_config_for_phrases(["cat"], ("bitmask",)))
    assert config.bitmask.name == "bitmask" and config.brush is None and config.rectangle is None
    mask = ellipse(60, 80, 30, 40, 15, 25)
    prediction, _ = build_prediction(detection_result([mask], ("cat",)), config, "v")
    background = (90, 90, 90)
    drawn = np.asarray(draw_overlay(Image.new("RGB", (80, 60), background), prediction)).astype(int)
    tinted = (drawn != background).any(axis=2)
    assert np.array_equal(tinted, mask)
    assert len(np.unique(drawn[mask], axis=0)) == 1  # one tint, towards the label's colour on every channel
    assert (np.sign(drawn[mask][0] - background) == np.sign(np.asarray(PALETTE[0]) - background)).all()
