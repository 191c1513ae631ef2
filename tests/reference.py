"""The reference implementations our engines are compared with, importable without torchvision.

transformers' SAM 2 and SAM 3 post-processing (``Sam2ImageProcessor.post_process_masks``,
``Sam3ImageProcessor.post_process_instance_segmentation``) live in modules that import
``torchvision.ops.boxes.batched_nms`` at the top, for other methods. The CPU torch wheel this
project installs has no torchvision that imports beside it (PyPI's fails: "operator
torchvision::nms does not exist"), so, only when no torchvision can be imported, these tests put a
**stub** ``torchvision`` in ``sys.modules`` whose ``batched_nms`` raises. The reference methods
used here never call it (they are plain torch), so what runs is transformers' own code, unchanged.
The methods are called on the class (they read nothing of ``self``), so no torchvision-backed
image processor is ever constructed.
"""

from __future__ import annotations

import importlib
import sys
import types


def _stub_torchvision() -> None:
    import transformers  # noqa: F401 - decides "torchvision available?" before any stub exists

    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - missing or broken (the CUDA wheel beside CPU torch): stub it
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    def batched_nms(*args, **kwargs):
        raise NotImplementedError("stub torchvision (tests/reference.py): the reference path must not call it")

    package = types.ModuleType("torchvision")
    package.__path__ = []  # a package, so submodule imports resolve to the stubs below
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = ops.batched_nms = batched_nms
    package.ops, ops.boxes = ops, boxes
    sys.modules.update({"torchvision": package, "torchvision.ops": ops, "torchvision.ops.boxes": boxes})


def reference_class(module: str, name: str):
    """``reference_class("transformers.models.sam2.image_processing_sam2", "Sam2ImageProcessor")``."""
    _stub_torchvision()
    return getattr(importlib.import_module(module), name)
