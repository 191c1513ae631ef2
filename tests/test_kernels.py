"""The engine's custom Triton kernels on the CPU, in Triton's interpreter (``TRITON_INTERPRET=1``).

The fused multi-scale deformable attention (``backend/engine/msda.py``) against transformers'
PyTorch path and an fp64 oracle, at Grounding DINO-T's real level shapes: the cases of
``bench/kernels.py`` (the one place they are defined), here with fewer queries per case so the
interpreter gets through them in about a minute. Then the install on tiny Grounding DINO /
MM-Grounding-DINO models: nothing changes on the CPU, and forced under the interpreter the
detector's outputs stay the same. And the kernel compiles for an H100 (sm_90), no GPU needed.

Needs ``triton`` (the CPU torch wheel does not pull it; CI installs it from requirements-test.txt).
Without it the module is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def _import_triton_interpreted():
    """Import Triton with its interpreter on: ``TRITON_INTERPRET`` is read when ``triton.language``
    is imported (its own helpers such as ``tl.zeros`` are built then), so it is set for the import
    only and the rest of the session sees the environment as it was."""
    reason = "triton is not installed (CI installs it: requirements-test.txt)"
    if "triton" in sys.modules:  # imported earlier in this process: as it was imported
        return pytest.importorskip("triton.language", reason=reason)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return pytest.importorskip("triton.language", reason=reason)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_triton_language = _import_triton_interpreted()
if type(_triton_language.zeros).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before this module without TRITON_INTERPRET=1: run this file alone",
                allow_module_level=True)

from backend.engine import msda  # noqa: E402
from bench.kernels import (  # noqa: E402
    TOLERANCE, check_msda, compile_for_gpu, level_shapes, msda_cases, msda_inputs, name_of,
)

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# The bench's cases with fewer queries: the interpreter's cost is per program (one per batch x
# head here), so this saves less than the counts suggest.
CASES = msda_cases(encoder_queries=512, decoder_queries=256)


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """TRITON_INTERPRET=1 while this module runs (the kernel's module is decorated under it, and
    :func:`backend.engine.msda.interpreting` reads it)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    kernel_module = sys.modules.get("backend.engine.msda_kernel")
    if kernel_module is not None and type(kernel_module.msda_forward_kernel).__name__ != "InterpretedFunction":
        del sys.modules["backend.engine.msda_kernel"]
    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


def test_level_shapes_are_grounding_dino_ts():
    assert level_shapes(800, 1333) == [(100, 167), (50, 84), (25, 42), (13, 21)]
    assert level_shapes(1333, 800) == [(167, 100), (84, 50), (42, 25), (21, 13)]
    assert sum(h * w for h, w in level_shapes(800, 1333)) == 22223


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_msda_matches_the_pytorch_path(case):
    figures = check_msda(case, CPU)
    assert figures["ok"], figures
    assert figures["kernel_rel"] <= TOLERANCE[case.dtype]
    if case.dtype != torch.float32:  # the kernel accumulates in fp32: never farther from exact than PyTorch's half path
        assert figures["kernel_rel_l2"] <= figures["torch_rel_l2"] or np.isnan(figures["torch_rel_l2"]), figures


def test_msda_far_outside_and_odd_sizes():
    """Locations far outside (all four corners out: zero, no integer overflow), a head_dim that is
    not a power of two, one query, and non-contiguous inputs."""
    generator = torch.Generator().manual_seed(3)
    shapes = torch.tensor([[5, 7], [3, 4]])
    starts = torch.tensor([0, 35])
    value = torch.randn(2, 47, 3, 24, generator=generator)
    locations = torch.rand(2, 5, 3, 2, 3, 2, generator=generator) * 1.4 - 0.2
    locations[0, 0] = 1e4
    locations[1, 1] = -1e4
    locations[1, 2, :, :, :, 0] = 3e9
    weights = torch.rand(2, 5, 3, 2, 3, generator=generator)
    fused = msda.msda_triton(value, shapes, starts, locations, weights)
    expected = msda.msda_reference(value.double(), shapes, starts, locations.double(), weights.double())
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=0)
    assert not fused[0, 0].any() and not fused[1, 1].any()
    one = msda.msda_triton(value[:, :, :, :16], shapes, starts, locations[:, :1], weights[:, :1])
    torch.testing.assert_close(one, msda.msda_reference(value[:, :, :, :16], shapes, starts, locations[:, :1],
                                                        weights[:, :1]), atol=1e-5, rtol=0)
    strided = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    torch.testing.assert_close(msda.msda_triton(strided, shapes, starts, locations, weights), fused)


def test_msda_rejects_mismatched_inputs():
    inputs = msda_inputs(CASES[0])
    with pytest.raises(ValueError):
        msda.msda_triton(**{**inputs, "attention_weights": inputs["attention_weights"][:, :-1]})
    with pytest.raises(TypeError):
        msda.msda_triton(**{k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()})


# -- the install on loaded models ------------------------------------------------------------------

@pytest.fixture(scope="module", params=["grounding-dino", "mm-grounding-dino"])
def dino_dir(request, tiny_models, tiny_family):
    return tiny_models / "grounding-dino" if request.param == "grounding-dino" else tiny_family(request.param)


def _detector(source):
    from backend.engine.detector import GroundingDinoDetector

    return GroundingDinoDetector(str(source), CPU, torch.float32, box_threshold=0.0, text_threshold=0.0,
                                 nms_threshold=1.0, max_detections=10**6, batch_size=4)


def _images():
    rng = np.random.default_rng(0)
    # a landscape image, one that pads its canvas (4:3), and a portrait one: both canvases, padding masks
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in
            ((333, 200), (320, 240), (240, 331))]


def _detect(detector):
    return detector.detect(_images(), [["cat", "red car"], ["cat"], ["dog", "cat"]])


def test_install_does_nothing_on_the_cpu(dino_dir):
    detector = _detector(dino_dir)
    before = _detect(detector)
    assert msda.install_fused_msda(detector.model) == 0
    assert not any("forward" in vars(inner) for _, inner in msda._msda_layers(detector.model))
    for old, new in zip(before, _detect(detector)):
        assert np.array_equal(old.boxes, new.boxes) and np.array_equal(old.scores, new.scores)


def test_forced_install_gives_the_same_detections(dino_dir):
    """On the CPU under the interpreter (``force``): every MSDA module runs the kernel, and the
    detector's boxes, scores and phrases are those of the PyTorch path."""
    detector = _detector(dino_dir)
    before = _detect(detector)
    layers = msda._msda_layers(detector.model)
    config = detector.model.config
    assert len(layers) == config.encoder_layers + config.decoder_layers
    assert msda.install_fused_msda(detector.model, force=True) == len(layers)
    assert msda.install_fused_msda(detector.model, force=True) == len(layers)  # again: not wrapped twice
    assert all(inner.forward.__wrapped__.__self__ is inner for _, inner in layers)
    calls = []
    original = msda.msda_triton
    try:
        msda.msda_triton = lambda *a: calls.append(tuple(map(tuple, a[1].tolist()))) or original(*a)
        after = _detect(detector)
    finally:
        msda.msda_triton = original
    assert len(calls) == 2 * len(layers)  # two canvases (landscape, portrait) per detect, each layer once
    # the level shapes the model computed are those bench/kernels.py derives for its canvases
    canvases = {detector.canvas_for(image.width, image.height) for image in _images()}
    assert set(calls) == {tuple(level_shapes(*canvas)) for canvas in canvases}
    for old, new in zip(before, after):
        assert old.phrases == new.phrases
        np.testing.assert_allclose(new.boxes, old.boxes, atol=1e-3, rtol=0)  # pixels
        np.testing.assert_allclose(new.scores, old.scores, atol=1e-5, rtol=0)


def test_installed_forward_falls_back_where_the_kernel_does_not_apply(tiny_models):
    from backend.engine.detector import model_class

    source = str(tiny_models / "grounding-dino")
    model = model_class(source).from_pretrained(source).eval()
    assert msda.install_fused_msda(model, force=True) > 0
    inner = msda._msda_layers(model)[0][1]
    case = CASES[0]
    inputs = msda_inputs(case)
    args = lambda d: (inputs["value"].to(d), inputs["spatial_shapes"], case.shapes, inputs["level_start_index"],  # noqa: E731
                      inputs["sampling_locations"].to(d), inputs["attention_weights"].to(d), 64)
    expected = msda.msda_reference(*(a for i, a in enumerate(args(torch.float64)) if i not in (2, 6)))
    assert torch.equal(inner(*args(torch.float64)), expected)  # fp64: transformers' code, bit for bit
    value = inputs["value"].clone().requires_grad_()
    out = inner(value, *args(torch.float32)[1:])
    out.sum().backward()  # gradients: transformers' code, which has a backward
    assert value.grad is not None


def test_install_without_triton_changes_nothing(tiny_models, monkeypatch):
    from backend.engine.detector import model_class

    source = str(tiny_models / "grounding-dino")
    model = model_class(source).from_pretrained(source).eval()
    monkeypatch.setattr(msda, "triton_available", lambda: False)
    assert msda.install_fused_msda(model, force=True) == 0


def test_the_msda_module_imports_without_triton():
    code = ("import sys, backend.engine.msda as m; assert 'triton' not in sys.modules, 'triton imported';"
            "import torch; assert m.install_fused_msda(torch.nn.Linear(2, 2)) == 0")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_the_kernel_compiles_for_an_h100():
    """Triton's own compiler, not the interpreter: PTX and a cubin for sm_90 (ptxas ships in the
    triton wheel), with 16-byte vector loads of the value rows."""
    outcome = compile_for_gpu(90, (name_of(torch.bfloat16),))["bf16"]
    assert outcome["ok"], outcome
    assert outcome["vector_loads"] > 0, outcome
