"""The engine's host waits: one per stage per batch, not per image (issue 22, part 2).

On the CPU: batched mask upsampling (several images in one call, bit-packed, one copy) gives the
processors' masks; a batch of 8 makes as many HostCopy waits as a batch of 1; and the hot path has
no blocking ``.cpu()`` / ``.item()`` / ``.tolist()`` left. Where CUDA exists, the sync debug mode
finds no synchronizing operation made by backend/ code (``bench/syncs.py`` reports the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.engine.masks import MaskJob, binary_to_masks, pack_bits, upsample_batch
from backend.engine.transfer import HostCopy
from backend.results import CompactMask
from bench.syncs import measure

REPO = Path(__file__).resolve().parent.parent


def test_one_call_for_several_images_gives_each_image_the_processors_masks(tiny_settings):
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    processor = SamImageProcessorPil.from_pretrained(tiny_settings.sam_model)
    generator = torch.Generator().manual_seed(3)
    frames = [((199, 301), (170, 256)), ((411, 97), (256, 61)), ((199, 301), (170, 256)), ((48, 64), (192, 256)),
              ((199, 301), (170, 256))]
    counts = [3, 2, 0, 4, 5]  # an image without boxes in the middle keeps the others aligned
    jobs = []
    for (original, reshaped), count in zip(frames, counts):
        logits = torch.randn(count, 64, 64, generator=generator) * 4
        if count > 1:
            logits[1] = -10  # an empty mask
        jobs.append(MaskJob(logits, 256, reshaped, original))
    for budget in (1, 5 * 2**20, 2**30):  # one mask per chunk, a few, all of a frame at once
        masks, extras = upsample_batch(jobs, budget_bytes=budget, extras=[torch.arange(3)]).result()
        assert [len(m) for m in masks] == counts and extras[0].tolist() == [0, 1, 2]
        for job, image_masks in zip(jobs, masks):
            if not len(job.logits):
                continue
            reference = processor.post_process_masks([job.logits[:, None].clone()], [job.original_size],
                                                     [job.reshaped_size])[0][:, 0].numpy()
            assert np.array_equal(np.stack([m.full() for m in image_masks]), reference)
            assert all(m.crop.dtype == bool for m in image_masks)
        assert masks[0][1].is_empty and masks[3][1].box() is None


@pytest.mark.parametrize("width", [1, 7, 8, 9, 16, 17, 301])
def test_bit_packing_round_trips_with_numpys_unpackbits(width):
    binary = torch.rand(3, 5, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = pack_bits(binary)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, (width + 7) // 8)
    assert np.array_equal(np.unpackbits(packed.numpy(), axis=-1)[..., :width].astype(bool), binary.numpy())


def test_binary_masks_become_the_compact_masks_of_their_foreground():
    binary = torch.zeros(3, 40, 61, dtype=torch.bool)
    binary[0, 10:20, 5:9] = True
    binary[0, 25, 60] = True
    binary[2, 0, 0] = True
    masks = binary_to_masks(binary)
    for mask, full in zip(masks, binary.numpy()):
        expected = CompactMask.from_full(full)
        assert (mask.top, mask.left, mask.crop.shape) == (expected.top, expected.left, expected.crop.shape)
        assert np.array_equal(mask.full(), full)
    assert masks[1].is_empty and binary_to_masks(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_host_copy_takes_tensors_of_one_device():
    with pytest.raises(ValueError, match="one device"):
        HostCopy([torch.zeros(2), torch.zeros(2, device="meta")])
    assert [a.tolist() for a in HostCopy([torch.arange(3), torch.ones(2)]).result()] == [[0, 1, 2], [1.0, 1.0]]


def test_a_batch_waits_as_often_as_a_single_image():
    """Two waits per ``Engine.run`` whatever the batch: the detector's outputs (on CUDA the device
    encodes SAM meanwhile), and all masks together."""
    figures = measure("cpu", 6)
    assert figures["uploads_intact"]
    one, many = figures["runs"]
    assert many["images"] == 6 and many["masks"] > one["masks"] > 0
    assert one["waits"] == many["waits"] == 2


#: The engine's per-batch path: no blocking device→host read may appear in these.
HOT_PATH = {
    "backend/engine/engine.py": ["Engine.run", "Engine._encode_ahead", "Engine._launch_detect"],
    "backend/engine/detector.py": ["GroundingDinoDetector.launch", "GroundingDinoDetector._launch",
                                   "GroundingDinoDetector._postprocess", "PendingDetections.result"],
    "backend/engine/segmenter.py": ["SamSegmenter.embed", "SamSegmenter.segment", "SamSegmenter._decode_boxes",
                                    "SamSegmenter.refine"],
    "backend/engine/masks.py": ["upsample_batch", "_upsample", "pack_bits", "_bounds", "PendingMasks.result"],
    "backend/engine/preprocess.py": ["upload", "Normalizer.__call__"],
}
BLOCKING = {"cpu", "item", "tolist"}


def _functions(tree: ast.Module) -> dict[str, ast.AST]:
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return found


def test_the_hot_path_has_no_blocking_reads():
    for path, names in HOT_PATH.items():
        functions = _functions(ast.parse((REPO / path).read_text()))
        for name in names:
            calls = [node for node in ast.walk(functions[name]) if isinstance(node, ast.Call)]
            blocking = [ast.unparse(c) for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr in BLOCKING]
            # torch.tensor(host data, device=...) is a blocking host→device copy: to_device() instead
            blocking += [ast.unparse(c) for c in calls if ast.unparse(c.func) == "torch.tensor"
                         and any(k.arg == "device" for k in c.keywords)]
            assert not blocking, f"{path} {name}: {blocking}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs bench/syncs.py there)")
def test_no_synchronizing_cuda_operation_comes_from_our_code():
    figures = measure("cuda", 6)
    one, many = figures["runs"]
    assert one.get("ours", 0) == many.get("ours", 0) == 0, many
    assert one["waits"] == many["waits"] and figures["uploads_intact"]
