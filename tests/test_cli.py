"""`python -m backend predict` and `make-tiny-models` as a user runs them (real subprocesses)."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from backend.rle import rle_to_mask
from tests.conftest import REPO


def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_predict_writes_ls_json_and_an_overlay(tmp_path, tiny_env):
    image_path = tmp_path / "in.jpg"
    Image.new("RGB", (160, 90), (120, 200, 40)).save(image_path)
    out_json, overlay = tmp_path / "out.json", tmp_path / "overlay.png"
    done = run_cli(["predict", str(image_path), "--prompt", "cat . red car", "--json", str(out_json),
                    "--overlay", str(overlay)], tiny_env)
    assert done.returncode == 0, done.stderr
    prediction = json.loads(out_json.read_text())
    regions = prediction["result"]
    assert regions and {r["value"][r["type"]][0] for r in regions} <= {"cat", "red car"}
    for region in regions:
        assert (region["original_width"], region["original_height"]) == (160, 90)
        if region["type"] == "brushlabels":
            assert rle_to_mask(region["value"]["rle"], 90, 160).any()
    drawn = np.asarray(Image.open(overlay).convert("RGB"))
    assert drawn.shape == (90, 160, 3)
    assert (drawn != np.asarray(Image.open(image_path).convert("RGB"))).any(), "overlay draws nothing"


def test_predict_reports_unreadable_input(tmp_path, tiny_env):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    done = run_cli(["predict", str(bad), "--prompt", "cat"], tiny_env)
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = run_cli(["predict", str(bad), "--prompt", " . , "], tiny_env)
    assert done.returncode == 2 and "no phrases" in done.stderr


def test_make_tiny_models_writes_loadable_model_dirs(tiny_models):
    for name in ("grounding-dino", "sam"):
        assert (tiny_models / name / "config.json").is_file()
        assert (tiny_models / name / "model.safetensors").is_file()
        assert (tiny_models / name / "preprocessor_config.json").is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "grounding-dino")
    ids = tokenizer("red car . dog ?")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and 1012 in ids and 1029 in ids  # bert-base-uncased ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "red car. dog?"


def polygon_region(label, points, width, height, score=0.8):
    return {"type": "polygonlabels", "from_name": "polygon", "to_name": "image", "original_width": width,
            "original_height": height, "score": score, "value": {"points": points, "closed": True,
                                                                  "polygonlabels": [label]}}


def test_overlay_outlines_a_polygon_in_its_labels_colour():
    """Points are LS percent of original_width x original_height (x of the width, y of the height):
    the outline runs through their pixels in the label's palette colour; inside and outside keep
    the image's pixels."""
    from backend.cli import draw_overlay
    from backend.cli_video import PALETTE

    width, height = 200, 100
    triangle = [[10.0, 10.0], [90.0, 50.0], [30.0, 90.0]]  # pixels (20, 10), (180, 50), (60, 90)
    box = {"type": "rectanglelabels", "original_width": width, "original_height": height, "score": 0.5,
           "value": {"x": 1.0, "y": 80.0, "width": 5.0, "height": 10.0, "rotation": 0, "rectanglelabels": ["cat"]}}
    prediction = {"result": [box, polygon_region("dog", triangle, width, height)]}
    background = (90, 90, 90)
    drawn = np.asarray(draw_overlay(Image.new("RGB", (width, height), background), prediction))
    dog = PALETTE[1]  # labels sorted: cat, dog
    is_dog = (drawn == dog).all(axis=2)
    corners = [(20, 10), (180, 50), (60, 90)]
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
        for t in np.linspace(0.05, 0.95, 10):  # all along every edge
            x, y = int(round(ax + t * (bx - ax))), int(round(ay + t * (by - ay)))
            assert is_dog[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any(), (x, y)
    inside, outside = (85, 50), (150, 15)
    assert tuple(drawn[inside[1], inside[0]]) == background and tuple(drawn[outside[1], outside[0]]) == background
    ys, xs = np.nonzero(is_dog)
    assert xs.min() >= 19 and xs.max() <= 181 and ys.min() >= 9 and ys.max() <= 91  # nowhere else
    assert (drawn == PALETTE[0]).all(axis=2).any(), "the rectangle keeps its own label's colour"


def test_overlay_labels_polygons_when_there_are_no_boxes():
    from backend.cli import draw_overlay

    square = [[20.0, 20.0], [80.0, 20.0], [80.0, 80.0], [20.0, 80.0]]
    prediction = {"result": [polygon_region("dog", square, 200, 100)]}
    painted = np.asarray(draw_overlay(Image.new("RGB", (200, 100)), prediction)).any(axis=2)
    assert painted[22:35, 43:100].any(), "the label is written inside the polygon's top-left corner"
    assert not painted[45:55, 60:140].any()


def test_cli_config_has_a_control_per_output_kind():
    from backend.cli import _config_for_phrases, parse_outputs
    from backend.ls.labelconfig import parse_label_config

    assert parse_outputs("polygon, rectangle") == ("rectangle", "polygon")
    config = parse_label_config(_config_for_phrases(["cat", "red car"], ("rectangle", "brush", "polygon")))
    assert config.rectangle.name == "label" and config.brush.name == "mask" and config.polygon.name == "polygon"
    assert config.polygon.labels == ("cat", "red car") and config.polygon.to_name == config.rectangle.to_name
    only = parse_label_config(_config_for_phrases(["cat"], ("polygon",)))
    assert only.polygon is not None and only.rectangle is None and only.brush is None
    default = parse_label_config(_config_for_phrases(["cat"]))
    assert default.polygon is None and default.rectangle is not None and default.brush is not None


def test_predict_writes_polygons_when_asked(tmp_path, tiny_env):
    image_path = tmp_path / "in.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(image_path)
    out_json, overlay = tmp_path / "out.json", tmp_path / "overlay.png"
    done = run_cli(["predict", str(image_path), "--prompt", "cat? red car", "--outputs", "polygon,rectangle",
                    "--json", str(out_json), "--overlay", str(overlay)], tiny_env)
    assert done.returncode == 0, done.stderr
    regions = json.loads(out_json.read_text())["result"]
    assert {r["type"] for r in regions} == {"rectanglelabels", "polygonlabels"}
    for region in regions:
        assert region["value"][region["type"]][0] in {"cat", "red car"}
        if region["type"] == "polygonlabels":
            assert region["from_name"] == "polygon" and len(region["value"]["points"]) >= 3
    assert overlay.is_file()
    done = run_cli(["predict", str(image_path), "--prompt", "cat", "--outputs", "circle"], tiny_env)
    assert done.returncode == 2 and "rectangle, brush, polygon" in done.stderr
