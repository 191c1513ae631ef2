"""End-to-end: bitmask predictions (``<BitmaskLabels>``) in a real Label Studio 1.23, checked against
the engine's masks, accepted as an annotation and exported by LS itself.

1. "Retrieve predictions" on a project with ``BitmaskLabels`` and ``BrushLabels`` side by side, on an
   EXIF-rotated JPEG and an odd-sized PNG: LS stores ``bitmasklabels`` regions whose PNG is the
   image's size as displayed (EXIF-transposed) and whose alpha is exactly the engine's mask (the
   brush RLE of the same detection, decoded by label-studio-sdk).
2. The stable interface's config (``<BitmaskLabels name="bm" toName="image">`` alone): the
   prediction is accepted as an annotation and exported as JSON, JSON-MIN and CSV (the formats LS
   1.23.2 enables for it; the image formats are disabled: docs/bitmask.md).

Reuses the session's LS server (tests/conftest.py) and starts its own backend on the tiny models.
Run: ``pytest -m e2e tests/test_e2e_bitmask.py``.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.bitmask import data_url_to_png, png_to_mask
from tests.test_e2e_label_studio import _decode_mask, connect, logs_on_failure
from tests.test_e2e_polygons import export

pytestmark = pytest.mark.e2e

SIDE_BY_SIDE = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <BitmaskLabels name="bm" toName="image"><Label value="cat"/><Label value="dog"/></BitmaskLabels>
</View>"""
STABLE = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <BitmaskLabels name="bm" toName="image"><Label value="cat"/><Label value="dog"/></BitmaskLabels>
</View>"""


def shapes(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (200, 220, 180))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.1, height * 0.15, width * 0.55, height * 0.7], fill=(230, 120, 20))
    draw.rectangle([width * 0.6, height * 0.5, width * 0.92, height * 0.9], fill=(30, 60, 200))
    return image


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict:
    """name -> (path, displayed (width, height)): an EXIF-6 JPEG stored 320x240 (shown 240x320) and a
    301x199 PNG."""
    out = tmp_path_factory.mktemp("e2e-bitmask")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = out / "rotated.jpg"
    shapes(320, 240).save(rotated, "JPEG", quality=95, exif=exif.tobytes())
    odd = out / "odd.png"
    shapes(301, 199).save(odd)
    return {"rotated": (rotated, (240, 320)), "odd": (odd, (301, 199))}


def decoded_png(region: dict) -> Image.Image:
    return Image.open(io.BytesIO(data_url_to_png(region["value"]["imageDataURL"])))


def check_like_ls_draws(region: dict, size: tuple[int, int]) -> np.ndarray:
    """The region's PNG: LA or RGBA of the displayed image's size, black and opaque on the mask,
    (0, 0, 0, 0) elsewhere; returns the mask."""
    image = decoded_png(region)
    assert image.mode in ("LA", "RGBA") and image.size == size, (image.mode, image.size, size)
    rgba = np.asarray(image.convert("RGBA"))
    mask = rgba[..., 3] > 0
    assert (rgba[mask] == (0, 0, 0, 255)).all() and (rgba[~mask] == 0).all()
    assert np.array_equal(png_to_mask(region["value"]["imageDataURL"], size[1], size[0]), mask)
    return mask


def test_retrieved_bitmasks_are_the_engines_masks_accepted_and_exported(label_studio, ls, start_backend,
                                                                       image_files):
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    with logs_on_failure(label_studio, backend):
        # 1. side by side with BrushLabels: each bitmask is the brush mask of the same detection
        project_id = ls.create_project("e2e bitmask beside brush", SIDE_BY_SIDE)
        names = list(image_files)
        task_ids = ls.import_images(project_id, [image_files[name][0] for name in names])
        connect(ls, project_id, backend, "grounded-sam bitmask")
        ls.retrieve_predictions(project_id)
        for task_id, name in zip(task_ids, names):
            width, height = image_files[name][1]
            (prediction,) = ls.predictions(task_id)
            regions = prediction["result"]
            brushes = [r for r in regions if r["type"] == "brushlabels"]
            bitmasks = [r for r in regions if r["type"] == "bitmasklabels"]
            assert bitmasks and len(bitmasks) == len(brushes), [r["type"] for r in regions]
            for index, (brush, region) in enumerate(zip(brushes, bitmasks)):
                where = f"task {name} bitmask #{index}"
                assert (region["from_name"], region["to_name"]) == ("bm", "image"), where
                assert (region["original_width"], region["original_height"]) == (width, height), where
                assert region["value"]["bitmasklabels"] == brush["value"]["brushlabels"], where
                assert region["score"] == brush["score"], where
                mask = check_like_ls_draws(region, (width, height))
                engine_mask = _decode_mask(brush["value"]["rle"], width, height)
                assert mask.any() and np.array_equal(mask, engine_mask), f"{where}: not the engine's mask"

        # 2. the stable interface's config: accept the prediction, export it
        project_id = ls.create_project("e2e bitmask export", STABLE)
        (task_id,) = ls.import_images(project_id, [image_files["odd"][0]])
        connect(ls, project_id, backend, "grounded-sam bitmask export")
        ls.retrieve_predictions(project_id)
        (prediction,) = ls.predictions(task_id)
        regions = prediction["result"]
        assert regions and {r["type"] for r in regions} == {"bitmasklabels"}, str(regions)[:500]
        masks = [check_like_ls_draws(r, (301, 199)) for r in regions]
        ls.post(f"/api/tasks/{task_id}/annotations/", json={"result": regions, "parent_prediction": prediction["id"],
                                                             "was_cancelled": False})

        formats = {f["name"]: not f.get("disabled") for f in ls.get(f"/api/projects/{project_id}/export/formats")}
        enabled = sorted(name for name, on in formats.items() if on)
        assert {"JSON", "JSON_MIN", "CSV"} <= set(enabled), enabled
        assert not any(formats.get(name) for name in ("COCO", "YOLO", "BRUSH_TO_PNG", "BRUSH_TO_NUMPY")), enabled

        (task,) = json.loads(export(ls, project_id, "JSON"))
        (annotation,) = task["annotations"]
        assert [r["value"] for r in annotation["result"]] == [r["value"] for r in regions]
        assert annotation["result"][0]["original_width"] == 301

        (row,) = json.loads(export(ls, project_id, "JSON_MIN"))
        assert [(item["imageDataURL"], item["bitmasklabels"], item["original_width"], item["original_height"])
                for item in row["bm"]] == [(r["value"]["imageDataURL"], r["value"]["bitmasklabels"], 301, 199)
                                           for r in regions]

        (line,) = csv.DictReader(io.StringIO(export(ls, project_id, "CSV").decode()))
        from_csv = [png_to_mask(item["imageDataURL"], 199, 301) for item in json.loads(line["bm"])]
        assert all(np.array_equal(a, b) for a, b in zip(from_csv, masks)) and len(from_csv) == len(masks)
        print(f"[e2e] bitmask: {len(regions)} regions accepted; LS enables {enabled} for a "
              f"BitmaskLabels project")
