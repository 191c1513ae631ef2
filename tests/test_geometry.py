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

from backend.engine.engine import Engine, SamSegmenter
from backend.engine.results import CompactMask, Detections
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
