"""Polygon regions: masks drawn from shapes → polygons → rasterised back, config parsing, smart tools.

Round trip: a ``polygonlabels`` region's percent points → pixels (``geometry.percent_to_pixels``)
→ minus 0.5 (vertices sit on pixel centres, ``backend/ls/polygons.py``) → ``cv2.fillPoly``. LS
polygons have no holes, so the reference for IoU is the mask with its holes filled (background not
reachable from the border becomes foreground).
"""

from __future__ import annotations

import base64
from dataclasses import replace

import cv2
import numpy as np
import pytest

from backend.ls.geometry import percent_to_pixels
from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.polygons import PolygonParams, mask_polygons
from backend.ls.regions import build_mask_prediction, build_prediction
from backend.ls.tasks import PredictRequest
from backend.results import CompactMask, Detections, ImageResult, LabeledMasks, PromptedMask
from backend.rle import rle_to_mask
from backend.settings import Settings, SettingsError
from tests.test_protocol import png

POLYGON_ONLY = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat"/><Label value="dog" predicted_values="puppy"/>
  </PolygonLabels>
</View>"""

ALL_THREE = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="bird"/></PolygonLabels>
</View>"""


# ------------------------------------------------------------------ shapes and checks

def canvas(height, width):
    return np.zeros((height, width), np.uint8)


def ellipse_with_hole(height=240, width=320):
    mask = cv2.ellipse(canvas(height, width), (150, 120), (110, 70), 20, 0, 360, 1, -1)
    return cv2.ellipse(mask, (140, 125), (40, 25), -10, 0, 360, 0, -1).astype(bool)


def two_blobs(height=240, width=320):
    mask = cv2.circle(canvas(height, width), (70, 80), 45, 1, -1)
    return cv2.ellipse(mask, (230, 160), (60, 40), 35, 0, 360, 1, -1).astype(bool)


def thin_line(height=240, width=320):
    return cv2.line(canvas(height, width), (20, 30), (290, 210), 1, thickness=4).astype(bool)


def touching_border(height=240, width=320):
    mask = cv2.rectangle(canvas(height, width), (0, 0), (120, 90), 1, -1)  # top-left corner
    return cv2.circle(mask, (width - 10, height - 20), 70, 1, -1).astype(bool)  # cut by right and bottom


def non_square(height=97, width=251):
    mask = cv2.ellipse(canvas(height, width), (120, 50), (100, 35), 5, 0, 360, 1, -1)
    return cv2.rectangle(mask, (180, 0), (250, 40), 1, -1).astype(bool)  # overlaps the ellipse: one component


SHAPES = {"ellipse with a hole": ellipse_with_hole, "two disjoint blobs": two_blobs, "thin line": thin_line,
          "touching the border": touching_border, "non-square image": non_square}


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled: everything but the background reachable from the border
    (4-connected background, the dual of 8-connected foreground)."""
    background = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    cv2.floodFill(background, None, (0, 0), 2)
    return (background != 2)[1:-1, 1:-1]


def raster(regions: list[dict], height: int, width: int) -> np.ndarray:
    """The union of the polygon regions, rasterised with cv2.fillPoly (vertices at pixel centres)."""
    out = canvas(height, width)
    for region in regions:
        points = np.asarray(region["value"]["points"], np.float64)
        xs, ys = percent_to_pixels(points[:, 0], points[:, 1], width, height)
        fixed = np.round((np.stack([xs, ys], axis=1) - 0.5) * 256).astype(np.int32)  # 8 fraction bits
        cv2.fillPoly(out, [fixed], 1, shift=8)
    return out.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def check_polygon_region(region: dict, label: str, height: int, width: int) -> None:
    """LS's polygonlabels shape, every point inside the image."""
    assert region["type"] == "polygonlabels" and region["from_name"] == "poly" and region["to_name"] == "image"
    assert (region["original_width"], region["original_height"]) == (width, height)
    value = region["value"]
    assert set(value) == {"points", "closed", "polygonlabels"}
    assert value["closed"] is True and value["polygonlabels"] == [label]
    points = np.asarray(value["points"])
    assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
    assert ((points >= 0) & (points <= 100)).all()


def detection_result(masks: list[np.ndarray], phrases: tuple[str, ...]) -> ImageResult:
    compact = tuple(CompactMask.from_full(m) for m in masks)
    boxes = np.stack([m.box() for m in compact]) if compact else np.zeros((0, 4), np.float32)
    scores = np.linspace(0.9, 0.5, len(masks)).astype(np.float32)
    height, width = masks[0].shape
    return ImageResult(width, height, Detections(boxes, scores, phrases), compact)


# ------------------------------------------------------------------ shapes round trip

@pytest.mark.parametrize("name", list(SHAPES))
def test_polygons_rasterised_back_match_the_mask_with_holes_filled(name):
    mask = SHAPES[name]()
    height, width = mask.shape
    prediction, stats = build_prediction(detection_result([mask], ("cat",)), parse_label_config(POLYGON_ONLY), "v")
    regions = prediction["result"]
    for region in regions:
        check_polygon_region(region, "cat", height, width)
        assert region["score"] == pytest.approx(0.9)
    # one region per connected component: two for the blobs and for the border shapes, else one
    assert len(regions) == (2 if name in {"two disjoint blobs", "touching the border"} else 1)
    assert stats.regions == len(regions)
    back = raster(regions, height, width)
    reference = filled(mask)  # LS polygons cannot hold the ellipse's hole: compare with it filled
    assert iou(back, reference) >= 0.95, f"{name}: IoU {iou(back, reference):.3f}"
    if name == "ellipse with a hole":
        assert reference.sum() > mask.sum()  # the hole really is a hole, and the polygon covers it
        assert iou(back, mask) < iou(back, reference)


def test_each_blob_gets_its_own_polygon_largest_first():
    mask = two_blobs()
    polygons = mask_polygons(CompactMask.from_full(mask))
    assert len(polygons) == 2
    first, second = (cv2.fillPoly(canvas(*mask.shape), [np.round(p - 0.5).astype(np.int32)], 1).astype(bool)
                     for p in polygons)
    assert first.sum() > second.sum() and not (first & second).any()
    assert first[160, 230] and second[80, 70]  # the ellipse (larger) first, then the circle


def test_polygons_are_offset_from_the_crop_to_the_full_image():
    mask = np.zeros((50, 80), bool)
    mask[30:40, 60:75] = True
    compact = CompactMask.from_full(mask)
    assert (compact.top, compact.left) == (30, 60)
    (polygon,) = mask_polygons(compact, PolygonParams(tolerance=0))
    # pixel centres of the corner pixels: (60, 30) → (60.5, 30.5), (74, 39) → (74.5, 39.5)
    assert sorted(map(tuple, polygon.tolist())) == [(60.5, 30.5), (60.5, 39.5), (74.5, 30.5), (74.5, 39.5)]


def test_tolerance_trades_vertices_for_accuracy():
    mask = ellipse_with_hole()
    counts = {t: len(mask_polygons(CompactMask.from_full(mask), PolygonParams(tolerance=t))[0]) for t in (0, 1.5, 5)}
    assert counts[0] > counts[1.5] > counts[5] >= 3


def test_minimum_area_drops_small_components_only_when_asked():
    mask = two_blobs()
    mask[5:9, 300:305] = True  # a 20-pixel speck
    compact = CompactMask.from_full(mask)
    assert len(mask_polygons(compact)) == 3  # default minimum: 1 pixel, nothing dropped
    assert len(mask_polygons(compact, PolygonParams(min_area=21))) == 2
    assert len(mask_polygons(compact, PolygonParams(min_area=20))) == 3
    small_blob = int((filled(mask)[:, :150]).sum())  # the circle; the ellipse is larger
    assert len(mask_polygons(compact, PolygonParams(min_area=small_blob + 1))) == 1


@pytest.mark.parametrize("name", ["ellipse with a hole", "thin line", "non-square image"])
def test_minimum_area_counts_the_pixels_the_polygon_covers(name):
    """One component each: its area is exactly its pixels with the holes filled (the outline's)."""
    mask = SHAPES[name]()
    mask[0:3, 0:3] = False  # keep the shapes one component each (none of these reaches that corner)
    compact, covered = CompactMask.from_full(mask), int(filled(mask).sum())
    assert len(mask_polygons(compact, PolygonParams(min_area=covered))) == 1
    assert mask_polygons(compact, PolygonParams(min_area=covered + 1)) == []


def test_a_ragged_mask_yields_at_most_max_polygons_the_largest():
    from backend.ls.polygons import MAX_POLYGONS

    mask = np.zeros((200, 200), bool)
    for dy in (1, 2):
        for dx in (1, 2):
            mask[dy:120:4, dx:200:4] = True  # 30 x 50 = 1500 specks of 2 x 2 pixels
    mask[150:160, 100:110] = True  # one 10 x 10 square
    polygons = mask_polygons(CompactMask.from_full(mask), PolygonParams(tolerance=0))
    assert len(polygons) == MAX_POLYGONS < 1501
    assert sorted(map(tuple, polygons[0].tolist())) == [(100.5, 150.5), (100.5, 159.5), (109.5, 150.5),
                                                       (109.5, 159.5)]


def test_degenerate_components_are_skipped():
    mask = np.zeros((40, 60), bool)
    mask[5, 5] = True  # one pixel
    mask[20, 10:50] = True  # a one-pixel-wide straight line: a two-vertex outline
    assert mask_polygons(CompactMask.from_full(mask)) == []
    assert mask_polygons(CompactMask.empty(40, 60)) == []
    prediction, _ = build_prediction(detection_result([mask], ("cat",)), parse_label_config(POLYGON_ONLY), "v")
    assert prediction["result"] == []


@pytest.mark.parametrize("kwargs, message", [
    ({"tolerance": -1}, "tolerance"), ({"tolerance": float("nan")}, "tolerance"), ({"tolerance": 101}, "tolerance"),
    ({"tolerance": True}, "tolerance"), ({"min_area": -1}, "minimum polygon area"),
    ({"min_area": 2.5}, "minimum polygon area"),
])
def test_polygon_params_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolygonParams(**kwargs)


def test_polygon_tolerance_setting():
    assert Settings.from_env({}).polygon_tolerance == 1.5
    assert Settings.from_env({"POLYGON_TOLERANCE": "0"}).polygon_tolerance == 0
    for bad in ("-0.5", "nan", "two", "1000"):
        with pytest.raises(SettingsError, match="POLYGON_TOLERANCE"):
            Settings.from_env({"POLYGON_TOLERANCE": bad})


# ------------------------------------------------------------------ config and regions

def test_polygon_labels_alone_are_a_usable_config():
    config = parse_label_config(POLYGON_ONLY)
    assert config.rectangle is None and config.brush is None
    assert (config.polygon.name, config.polygon.to_name, config.polygon.labels) == ("poly", "image", ("cat", "dog"))
    assert config.labels == ("cat", "dog") and config.aliases == {"puppy": "dog"}
    assert config.map_phrase("puppy") == "dog"


def test_polygon_labels_beside_rectangles_and_brushes():
    config = parse_label_config(ALL_THREE)
    assert (config.rectangle.name, config.brush.name, config.polygon.name) == ("box", "mask", "poly")
    assert config.labels == ("cat", "dog", "bird")


def test_polygon_labels_on_another_image_are_ignored():
    config = parse_label_config('<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
                                '<BrushLabels name="m" toName="a"><Label value="x"/></BrushLabels>'
                                '<PolygonLabels name="p" toName="b"><Label value="x"/></PolygonLabels></View>')
    assert config.image_name == "a" and config.polygon is None


def test_a_config_without_any_output_control_names_polygon_labels_too():
    with pytest.raises(LabelConfigError, match="<PolygonLabels>"):
        parse_label_config('<View><Image name="i" value="$image"/><Choices name="c" toName="i">'
                           '<Choice value="a"/></Choices></View>')


def test_each_detection_yields_a_region_per_control_that_has_its_label():
    masks = [ellipse_with_hole(), two_blobs(), thin_line()]
    prediction, _ = build_prediction(detection_result(masks, ("cat", "dog", "bird")), parse_label_config(ALL_THREE), "v")
    kinds = sorted((r["type"], r["value"][r["type"]][0]) for r in prediction["result"])
    assert kinds == [("brushlabels", "cat"), ("brushlabels", "dog"), ("polygonlabels", "bird"),
                     ("polygonlabels", "cat"), ("rectanglelabels", "cat"), ("rectanglelabels", "dog")]
    brush = next(r for r in prediction["result"] if r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["cat"])
    polygon = next(r for r in prediction["result"] if r["type"] == "polygonlabels" and r["value"]["polygonlabels"]
                   == ["cat"])
    assert polygon["score"] == brush["score"]
    assert len({r["id"] for r in prediction["result"]}) == len(prediction["result"])


def test_smart_tool_masks_yield_polygons_with_their_label():
    mask = two_blobs()
    height, width = mask.shape
    labeled = LabeledMasks(width, height, (PromptedMask("cat", CompactMask.from_full(mask), 0.8),))
    prediction = build_mask_prediction(labeled, parse_label_config(POLYGON_ONLY), "v", PolygonParams(min_area=1))
    assert len(prediction["result"]) == 2
    for region in prediction["result"]:
        check_polygon_region(region, "cat", height, width)
    assert iou(raster(prediction["result"], height, width), filled(mask)) >= 0.95


# ------------------------------------------------------------------ smart tools through the real pipeline

SMART_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>"""


@pytest.mark.parametrize("tolerance", [0.0, 1.5])
def test_smart_tool_refine_answers_polygons_of_its_mask(tiny_settings, tolerance):
    from backend.pipeline.predict import Pipeline

    width, height = 96, 64
    pipeline = Pipeline(replace(tiny_settings, polygon_tolerance=tolerance))
    click = {"id": "k", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
             "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": True,
             "value": {"x": 50, "y": 50, "width": 0.5, "keypointlabels": ["dog"]}}
    image = "data:image/png;base64," + base64.b64encode(png(width, height)).decode()
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": image}}], config=parse_label_config(SMART_CONFIG),
                             context={"result": [click]})
    (prediction,) = pipeline.predict(request)
    brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    polygons = [r for r in prediction["result"] if r["type"] == "polygonlabels"]
    assert len(brushes) == 1 and polygons, prediction["result"]
    for region in polygons:
        check_polygon_region(region, "dog", height, width)
        assert region["score"] == brushes[0]["score"]
    mask = rle_to_mask(brushes[0]["value"]["rle"], height, width)
    # the tiny random-weight SAM gives a ragged mask of many small components: each is a polygon
    # (small, thin components are simplified finely), so the union matches the brush mask's outline
    assert iou(raster(polygons, height, width), filled(mask)) >= 0.95
