"""COMPILE=1 in a worker (issue 22, part 4): regional compile, ready means compiled, COMPILE_CACHE_DIR.

The cache test starts two fresh processes the way a worker builds its engine (bench/compile_start.py's
child: ``build_engine(Settings.from_env())`` with COMPILE=1) with the same COMPILE_CACHE_DIR: the
first fills it, the second only hits it. It uses the tiny SAM 3 at BATCH_SIZE=1 (2 block graphs,
~30 s cold on 2 cores; the tiny grounded-sam pair compiles 10 per bucket). No timed assertion: the
figures come from bench/compile_start.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GroundingDinoForObjectDetection, Sam2Model, Sam3Model, SamHQModel, SamModel

from backend.engine.compiling import block_classes, cache_key, compile_blocks, use_compile_cache
from backend.errors import ModelLoadError
from backend.settings import Settings
from bench.compile_start import engine_env, folder_size, start_once


def test_a_second_start_hits_the_cache_the_first_one_wrote(tiny_family, tmp_path):
    models = tiny_family("sam3").parent
    cache = tmp_path / "compile-cache"
    env = engine_env("sam3", models, "cpu", 1, cache)
    keyed = cache / cache_key(torch.device("cpu"))  # one folder per torch/Triton version and device

    cold = start_once(env, timeout=600)
    assert cold["cache_folder"] == str(keyed)
    assert folder_size(keyed)["files"] > 0 and (keyed / "fxgraph").is_dir()
    misses = cold["inductor"].get("fxgraph_cache_miss", 0)
    assert misses > 0 and not cold["inductor"].get("fxgraph_cache_hit")
    assert cold["graphs"] > 0 and cold["graphs_after_ready"] == 0  # compiled at load, not on the requests

    warm = start_once(env, timeout=600)
    assert warm["inductor"].get("fxgraph_cache_hit", 0) == misses
    assert not warm["inductor"].get("fxgraph_cache_miss")
    assert warm["aot_autograd"].get("autograd_cache_hit", 0) > 0
    assert warm["graphs_after_ready"] == 0


def test_the_repeated_blocks_of_each_encoder_are_found(tiny_models, tiny_family):
    dino = GroundingDinoForObjectDetection.from_pretrained(tiny_models / "grounding-dino")
    swin = dino.model.backbone.conv_encoder.model
    # Innermost: SwinStage holds the SwinLayer list, so the layers are the blocks.
    assert [c.__name__ for c in block_classes(swin)] == ["SwinLayer"]
    found = {
        "sam": block_classes(SamModel.from_pretrained(tiny_models / "sam").vision_encoder),
        "sam-hq": block_classes(SamHQModel.from_pretrained(tiny_family("sam-hq")).vision_encoder),
        "sam2": block_classes(Sam2Model.from_pretrained(tiny_family("sam2")).vision_encoder),  # neck's Conv2d: not
        "sam3": block_classes(Sam3Model.from_pretrained(tiny_family("sam3")).vision_encoder.backbone),
    }
    assert {name: [c.__name__ for c in classes] for name, classes in found.items()} == {
        "sam": ["SamVisionLayer"], "sam-hq": ["SamHQVisionLayer"], "sam2": ["Sam2MultiScaleBlock"],
        "sam3": ["Sam3ViTLayer"]}
    with pytest.raises(ValueError, match="no ModuleList of blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), "a linear layer")


def test_compile_cache_dir_setting_and_folder(tmp_path, monkeypatch):
    assert Settings.from_env({"COMPILE_CACHE_DIR": " /cache "}).compile_cache_dir == "/cache"
    assert Settings.from_env({}).compile_cache_dir is None
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))  # restored after the test
    folder = use_compile_cache(tmp_path / "cache", torch.device("cpu"))
    assert folder == tmp_path / "cache" / cache_key(torch.device("cpu")) and folder.is_dir()
    assert cache_key(torch.device("cpu")).startswith(f"torch-{torch.__version__}-")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ModelLoadError, match="COMPILE_CACHE_DIR.*writable directory"):
        use_compile_cache(blocker, torch.device("cpu"))
