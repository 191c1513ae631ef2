"""Coordinate frames end to end: EXIF orientation, non-square images, pixels → LS percent → RLE.

``MarkerStubDetector`` is a stub standing in for Grounding DINO: it returns the bounding box of the
pure-red marker in the image it is handed. If the pipeline gives the detector the image LS displays
(EXIF-transposed), the rectangle LS gets must sit exactly on the marker as a viewer sees it.
"""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from backend.engine.engine import Engine
from backend.engine.segmenter import SamSegmenter
from backend.results import CompactMask, Detections
from backend.ls.labelconfig import parse_label_config
from backend.pipeline.predict import Pipeline
from backend.rle import rle_to_mask
from backend.ls.tasks import PredictRequest

CONFIG = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="box" toName="image"><Label value="marker"/></RectangleLabels>'
          '<BrushLabels name="mask" toName="image"><Label value="marker"/></BrushLabels></View>')


class MarkerStubDetector:
    """Stub detector: one box around the red marker, in the pixel frame of the image it receives."""

    def __init__(self):
        self.seen_sizes = []

    def detect(self, images, phrases):
        results = []
        for image in images:  # the engine hands a model without prepare() the PIL image itself
            self.seen_sizes.append(image.size)
            pixels = np.asarray(image).astype(int)
            ys, xs = np.nonzero((pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90))
            box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
            results.append(Detections(boxes=box, scores=np.array([0.9], np.float32), phrases=("marker",)))
        return results


class BoxFillStubSegmenter:
    """Stub segmenter: each mask is its box filled, so mask placement can be checked exactly."""

    def segment(self, images, boxes, keys=None):
        masks = []
        for image, image_boxes in zip(images, boxes):
            out = np.zeros((len(image_boxes), image.height, image.width), bool)
            for i, (x0, y0, x1, y1) in enumerate(np.round(image_boxes).astype(int)):
                out[i, y0:y1, x0:x1] = True
            masks.append([CompactMask.from_full(mask) for mask in out])
        return masks


def data_uri(image: Image.Image, fmt: str, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def with_marker(width, height, box):
    image = Image.new("RGB", (width, height), (200, 200, 200))
    image.paste((255, 0, 0), box)
    return image


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def predict(pipeline, url):
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": url}}], config=parse_label_config(CONFIG),
                             context=None)
    prediction = pipeline.predict(request)[0]
    rect = next(r for r in prediction["result"] if r["type"] == "rectanglelabels")
    brush = next(r for r in prediction["result"] if r["type"] == "brushlabels")
    return rect, brush


def assert_rectangle_on(rect, box, width, height):
    assert (rect["original_width"], rect["original_height"]) == (width, height)
    x0, y0, x1, y1 = box
    value = rect["value"]
    assert value["x"] == pytest.approx(100 * x0 / width, abs=100 * 2 / width)
    assert value["y"] == pytest.approx(100 * y0 / height, abs=100 * 2 / height)
    assert value["width"] == pytest.approx(100 * (x1 - x0) / width, abs=100 * 3 / width)
    assert value["height"] == pytest.approx(100 * (y1 - y0) / height, abs=100 * 3 / height)


@pytest.fixture
def stub_pipeline(tiny_settings):
    detector = MarkerStubDetector()
    pipeline = Pipeline(tiny_settings, engine_factory=lambda: Engine(detector, BoxFillStubSegmenter()))
    return pipeline, detector


def test_exif_orientation_6_jpeg_lands_where_the_viewer_sees_it(stub_pipeline):
    pipeline, detector = stub_pipeline
    # Stored 400x300 with the marker at x 40..80, y 30..90; orientation 6 = rotate 90° clockwise
    # to display, so the viewer sees 300x400 and the marker at x 300-90..300-30, y 40..80.
    stored = with_marker(400, 300, (40, 30, 80, 90))
    url = data_uri(stored, "JPEG", quality=95, exif=exif_orientation(6))
    rect, brush = predict(pipeline, url)
    assert detector.seen_sizes == [(300, 400)]
    assert_rectangle_on(rect, (210, 40, 270, 80), 300, 400)
    mask = rle_to_mask(brush["value"]["rle"], 400, 300)
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - 210) <= 2 and abs(xs.max() + 1 - 270) <= 2
    assert abs(ys.min() - 40) <= 2 and abs(ys.max() + 1 - 80) <= 2
    assert (brush["original_width"], brush["original_height"]) == (300, 400)


@pytest.mark.parametrize("size, box", [((301, 199), (250, 150, 290, 190)), ((97, 411), (3, 5, 40, 401)),
                                       ((640, 120), (0, 0, 17, 9))])
def test_non_square_images(stub_pipeline, size, box):
    pipeline, _ = stub_pipeline
    rect, brush = predict(pipeline, data_uri(with_marker(*size, box), "PNG"))
    assert_rectangle_on(rect, box, *size)
    mask = rle_to_mask(brush["value"]["rle"], size[1], size[0])
    expected = np.zeros((size[1], size[0]), bool)
    expected[box[1]:box[3], box[0]:box[2]] = True
    assert (mask == expected).all()


def test_real_sam_masks_follow_exif_orientation(tiny_settings):
    """Real tiny SAM: an EXIF-6 PNG and its pre-rotated twin decode to the same pixels, so every
    region must match exactly; the mask is at the displayed size."""
    segmenter = SamSegmenter(tiny_settings.sam_model, *_cpu_fp32(), batch_size=2)
    pipeline = Pipeline(tiny_settings, engine_factory=lambda: Engine(MarkerStubDetector(), segmenter))
    stored = with_marker(400, 300, (40, 30, 80, 90))
    rotated = stored.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 displays
    rect_a, brush_a = predict(pipeline, data_uri(stored, "PNG", exif=exif_orientation(6)))
    rect_b, brush_b = predict(pipeline, data_uri(rotated, "PNG"))
    assert rect_a["value"] == rect_b["value"] and brush_a["value"] == brush_b["value"]
    assert rle_to_mask(brush_a["value"]["rle"], 400, 300).shape == (400, 300)


def _cpu_fp32():
    import torch

    return torch.device("cpu"), torch.float32


# ------------------------------------------------------------------ LS percent <-> pixels (ls/geometry.py)
# A 400x100 image: one percent is 4 px along x and 1 px along y, so rotating in percent (mixing the
# two units) puts a rotated rectangle somewhere else; LS rotates about the top-left corner, in pixels.

SMART_CONFIG = ('<View><Image name="image" value="$image"/>'
                '<RectangleLabels name="box" toName="image" smart="true"><Label value="marker"/></RectangleLabels>'
                '<BrushLabels name="mask" toName="image"><Label value="marker"/></BrushLabels></View>')

# x 25% = 100 px, y 20% = 20 px, width 20% = 80 px, height 40% = 40 px; cos 30° = √3/2, sin 30° = 1/2
ROOT3 = 3 ** 0.5
ROTATED_30 = dict(x=25, y=20, width=20, height=40, rotation=30)
CORNERS_30 = [(100, 20), (100 + 40 * ROOT3, 20 + 40),  # top-left, top-right = TL + 80·(cos, sin)
              (100 + 40 * ROOT3 - 20, 20 + 40 + 20 * ROOT3),  # bottom-right = TR + 40·(-sin, cos)
              (100 - 20, 20 + 20 * ROOT3)]  # bottom-left = TL + 40·(-sin, cos)
# width 10% = 40 px, height 40% = 40 px, rotated 90°: the top edge points down, the left edge left
ROTATED_90 = dict(x=25, y=20, width=10, height=40, rotation=90)
CORNERS_90 = [(100, 20), (100, 60), (60, 60), (60, 20)]


def smart_rectangle(rect):
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "original_width": 400, "original_height": 100, "image_rotation": 0,
            "value": {**rect, "rectanglelabels": ["marker"]}}


@pytest.mark.parametrize("rect, corners", [(ROTATED_30, CORNERS_30), (ROTATED_90, CORNERS_90)])
def test_rotated_rectangle_corners_and_box_in_pixels_on_a_non_square_image(rect, corners):
    from backend.ls.geometry import PercentRect

    got = PercentRect(**rect).corners(400, 100)
    assert [c for corner in got for c in corner] == pytest.approx([c for corner in corners for c in corner])
    xs, ys = zip(*corners)
    assert PercentRect(**rect).pixel_box(400, 100) == pytest.approx((min(xs), min(ys), max(xs), max(ys)))


def test_rectangle_percent_round_trip_and_keypoints():
    from backend.ls.geometry import PercentRect, percent_to_pixels

    rect = PercentRect.from_pixel_box((40, 10, 120, 90), 400, 100)
    assert (rect.x, rect.y, rect.width, rect.height, rect.rotation) == (10, 10, 20, 80, 0)
    assert rect.pixel_box(400, 100) == pytest.approx((40, 10, 120, 90))
    assert rect.value() == {"x": 10, "y": 10, "width": 20, "height": 80, "rotation": 0}
    assert percent_to_pixels(25, 50, 400, 100) == (100, 50)


class RecordingStubSegmenter(BoxFillStubSegmenter):
    """Stub SAM for smart tools: records the prompts; each mask is its prompt's box filled."""

    def __init__(self):
        self.prompts = []

    def refine(self, image, key, prompts):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            x0, y0, x1, y1 = np.round(prompt.box).astype(int)
            mask = np.zeros((image.height, image.width), bool)
            mask[y0:y1, x0:x1] = True
            out.append((CompactMask.from_full(mask), 0.9))
        return out


@pytest.mark.parametrize("rect, corners", [(ROTATED_30, CORNERS_30), (ROTATED_90, CORNERS_90)])
def test_rotated_smart_rectangle_prompts_sam_with_its_pixel_box(tiny_settings, rect, corners):
    segmenter = RecordingStubSegmenter()
    pipeline = Pipeline(tiny_settings, engine_factory=lambda: Engine(MarkerStubDetector(), segmenter))
    # a click at pixel (90, 50): inside the rotated rectangle's pixel box in both cases, but outside
    # the box the old percent-space rotation gave the 90° one (x -15..25 %, y 20..30 %)
    click = {"from_name": "box", "to_name": "image", "type": "keypointlabels", "is_positive": True,
             "value": {"x": 22.5, "y": 50, "keypointlabels": ["marker"]}}
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": data_uri(Image.new("RGB", (400, 100)), "PNG")}}],
                             config=parse_label_config(SMART_CONFIG),
                             context={"result": [smart_rectangle(rect), click]})
    prediction = pipeline.predict(request)[0]
    xs, ys = zip(*corners)
    box = (min(xs), min(ys), max(xs), max(ys))
    prompt, = segmenter.prompts
    assert prompt.box.tolist() == pytest.approx(box)
    assert prompt.points.tolist() == [[90, 50]] and prompt.point_labels.tolist() == [1]
    rect_region = next(r for r in prediction["result"] if r["type"] == "rectanglelabels")
    x0, y0, x1, y1 = np.round(box)  # the stub's mask is the rounded box: the region is its bounds
    assert_rectangle_on(rect_region, (x0, y0, x1, y1), 400, 100)


def painted(image):
    """(H, W) bool: the pixels an overlay changed on a black image."""
    return np.asarray(image.convert("RGB")).any(axis=2)


def near(mask, point, radius=2):
    x, y = (int(round(v)) for v in point)
    return mask[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1].any()


def test_overlay_draws_a_rotated_rectangle_at_its_pixel_corners():
    from backend.cli import draw_overlay

    region = {"type": "rectanglelabels", "original_width": 400, "original_height": 100, "score": 0.5,
              "value": {**ROTATED_30, "rectanglelabels": ["marker"]}}
    drawn = painted(draw_overlay(Image.new("RGB", (400, 100)), {"result": [region]}))
    for (ax, ay), (bx, by) in zip(CORNERS_30, CORNERS_30[1:] + CORNERS_30[:1]):
        for t in (0.0, 0.5, 1.0):  # every corner and the middle of every edge is drawn
            assert near(drawn, (ax + t * (bx - ax), ay + t * (by - ay)))
    assert not near(drawn, (180, 20)) and not near(drawn, (100, 60))  # the unrotated corners are not
    assert not drawn[:, 175:].any() and not drawn[:, :75].any()


def test_overlay_draws_a_prediction_rectangle_on_its_pixel_box():
    from backend.cli import draw_overlay
    from backend.results import ImageResult
    from backend.ls.regions import build_prediction

    box = np.array([[40, 10, 120, 90]], np.float32)
    result = ImageResult(400, 100, Detections(box, np.array([0.9], np.float32), ("marker",)),
                         (CompactMask.empty(100, 400),))
    prediction, _ = build_prediction(result, parse_label_config(SMART_CONFIG.replace(' smart="true"', "")), "v")
    prediction["result"] = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
    drawn = painted(draw_overlay(Image.new("RGB", (400, 100)), prediction))
    ys, xs = np.nonzero(drawn)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (40, 10, 120, 90)
