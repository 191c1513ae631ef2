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
