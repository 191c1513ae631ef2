"""End-to-end: polygon predictions in a real Label Studio 1.23, accepted as an annotation and
exported by LS itself as YOLO and COCO (its export API), the formats users train on.

Reuses the session's LS server (tests/conftest.py) and starts its own backend on the tiny models.
Run: ``pytest -m e2e tests/test_e2e_polygons.py``.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.test_e2e_label_studio import connect, logs_on_failure

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat"/>
    <Label value="dog" predicted_values="puppy"/>
  </PolygonLabels>
</View>"""
LABELS = ("cat", "dog")
WIDTH, HEIGHT = 301, 199  # not square: percent along x and y differ


def shapes_png(path) -> None:
    image = Image.new("RGB", (WIDTH, HEIGHT), (200, 220, 180))
    draw = ImageDraw.Draw(image)
    draw.ellipse([30, 30, 170, 140], fill=(230, 120, 20))
    draw.rectangle([190, 100, 300, 198], fill=(30, 60, 200))  # touches the right and bottom borders
    image.save(path)


def check_polygon(region: dict, where: str) -> None:
    value = region["value"]
    assert region["from_name"] == "poly" and region["to_name"] == "image", where
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT), where
    assert value["closed"] is True and len(value["polygonlabels"]) == 1 and value["polygonlabels"][0] in LABELS, where
    points = np.asarray(value["points"], np.float64)
    assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3, f"{where}: {points.shape}"
    assert ((points >= 0) & (points <= 100)).all(), f"{where}: points outside the image"


def export(ls, project_id: int, kind: str) -> bytes:
    response = ls.request("GET", f"/api/projects/{project_id}/export", params={"exportType": kind}, timeout=120)
    return response.content


def zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def test_polygon_predictions_are_accepted_and_exported_as_yolo_and_coco(label_studio, ls, start_backend,
                                                                          tmp_path):
    path = tmp_path / "shapes.png"
    shapes_png(path)
    project_id = ls.create_project("e2e polygons", CONFIG)
    task_id, = ls.import_images(project_id, [path])
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    with logs_on_failure(label_studio, backend):
        connect(ls, project_id, backend, "grounded-sam polygons")

        # 1. "Retrieve predictions": LS stores the backend's polygonlabels regions as the prediction
        ls.retrieve_predictions(project_id)
        predictions = ls.predictions(task_id)
        assert len(predictions) == 1, predictions
        regions = predictions[0]["result"]
        assert regions and all(r["type"] == "polygonlabels" for r in regions), str(regions)[:1000]
        for index, region in enumerate(regions):
            check_polygon(region, f"stored prediction region #{index}")

        # 2. the annotator accepts the prediction: LS stores it as an annotation
        ls.post(f"/api/tasks/{task_id}/annotations/", json={"result": regions, "parent_prediction": predictions[0]["id"],
                                                             "was_cancelled": False})
        annotation, = ls.get(f"/api/tasks/{task_id}/annotations/")
        assert [r["value"]["points"] for r in annotation["result"]] == [r["value"]["points"] for r in regions]

        # 3. YOLO: a zip with labels/<image>.txt, one line per polygon: class x1 y1 x2 y2 ... in [0, 1]
        members = zip_members(export(ls, project_id, "YOLO"))
        labels = [name for name in members if name.startswith("labels/") and name.endswith(".txt")]
        assert len(labels) == 1, sorted(members)
        classes = members["classes.txt"].decode().split()
        lines = [line.split() for line in members[labels[0]].decode().splitlines() if line.strip()]
        assert len(lines) == len(regions), f"{len(lines)} YOLO polygons for {len(regions)} regions"
        for line, region in zip(lines, regions):
            assert classes[int(line[0])] == region["value"]["polygonlabels"][0]
            coords = np.asarray(line[1:], np.float64).reshape(-1, 2)
            assert len(coords) == len(region["value"]["points"]) >= 3
            assert ((coords >= 0) & (coords <= 1)).all(), "a YOLO polygon point leaves the image"

        # 4. COCO: segmentation lists of pixel coordinates inside the image
        data = export(ls, project_id, "COCO")
        coco = json.loads(zip_members(data)["result.json"] if zipfile.is_zipfile(io.BytesIO(data)) else data)
        image, = coco["images"]
        assert (image["width"], image["height"]) == (WIDTH, HEIGHT)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        assert len(coco["annotations"]) == len(regions)
        for item, region in zip(coco["annotations"], regions):
            assert names[item["category_id"]] == region["value"]["polygonlabels"][0]
            segmentation, = item["segmentation"]
            xy = np.asarray(segmentation, np.float64).reshape(-1, 2)
            assert len(xy) == len(region["value"]["points"]) >= 3
            assert ((xy[:, 0] >= 0) & (xy[:, 0] <= WIDTH) & (xy[:, 1] >= 0) & (xy[:, 1] <= HEIGHT)).all(), (
                "a COCO polygon point leaves the image")
            assert item["area"] > 0
        print(f"[e2e] polygons: {len(regions)} regions stored, accepted, exported as YOLO and COCO")
