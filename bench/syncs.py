"""Host waits per engine batch: does the host wait for the device once per batch, or per image?

Runs ``Engine.run`` (Grounding DINO + SAM) on batches of 1 and of ``--batch`` images and counts,
per call:

- ``waits``: our own waits, :class:`backend.engine.transfer.HostCopy` results (the engine's only
  sanctioned way to bring device values to the host); the figure should not grow with the batch;
- ``uploads_intact``: input canvases copied ahead by preparing threads arrive byte for byte;
- on CUDA, ``syncs``: every synchronizing CUDA operation ``torch.cuda.set_sync_debug_mode`` flags
  (a blocking copy, ``.item()``, ``nonzero``, ...), by the file of the Python line that made it:
  ``ours`` (backend/) must stay 0, ``library`` (transformers' models) is what is left to remove.

    python bench/syncs.py --device cuda --json OUT        # tiny random-weight models by default
    python bench/syncs.py --device cpu                    # waits only (the CPU has no device syncs)

``tests/test_host_waits.py`` asserts the same on CUDA where one exists.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.engine import transfer  # noqa: E402
from backend.engine.engine import Engine  # noqa: E402
from backend.engine.tiny import make_tiny_models  # noqa: E402
from backend.settings import Settings  # noqa: E402

PHRASES = ["cat", "dog", "car"]


def images(count: int) -> list[Image.Image]:
    """Textured landscape images (random weights find boxes in texture, not in blanks)."""
    generator = np.random.default_rng(7)
    return [Image.fromarray(generator.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(count)]


@contextmanager
def counting():
    """Counts HostCopy waits and (CUDA) sync-debug warnings by origin while the block runs."""
    counts = Counter()
    original = transfer.HostCopy.result

    def counted(self):
        counts["waits"] += 1
        return original(self)

    transfer.HostCopy.result = counted
    cuda = torch.cuda.is_available()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counts
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        for warning in caught:
            if "synchroniz" in str(warning.message):
                counts["ours" if str(REPO / "backend") in warning.filename else "library"] += 1
                counts[f"at {Path(warning.filename).name}:{warning.lineno}"] += 1
    finally:
        transfer.HostCopy.result = original


def count_run(engine: Engine, batch: int) -> dict:
    """Counts for one ``engine.run`` of ``batch`` images (after a warm-up run of the same batch)."""
    pictures = images(batch)
    engine.run(pictures, [PHRASES] * batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with counting() as counts:
        results = engine.run(pictures, [PHRASES] * batch)
    return {"images": batch, "masks": sum(len(r.masks) for r in results), **counts}


def uploads_intact(device: str, count: int = 4) -> bool:
    """Canvases whose copies started in preparing threads (and one made without the device, copied
    by the engine) reach the device byte for byte (``preprocess.upload``)."""
    from concurrent.futures import ThreadPoolExecutor

    from backend.engine.preprocess import to_canvas, upload

    target = torch.device(device)
    pictures = images(count)
    with ThreadPoolExecutor(2) as pool:  # as the pipeline does: other threads prepare
        ahead = list(pool.map(lambda p: to_canvas(p, (300, 400), (320, 416), Image.BILINEAR, device=target), pictures))
    plain = [to_canvas(p, (300, 400), (320, 416), Image.BILINEAR) for p in pictures]
    expected = torch.stack([c.pixels for c in plain])
    return all(torch.equal(upload(batch, target).cpu(), expected[: len(batch)])
               for batch in (ahead, plain, ahead[:1] + plain[1:]))


def measure(device: str, batch: int, models_dir: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        root = models_dir or Path(scratch)
        dino, sam = make_tiny_models(root)
        settings = replace(Settings.from_env({}), grounding_dino_model=str(dino), sam_model=str(sam), device=device,
                           batch_size=batch, box_threshold=0.0, text_threshold=0.0, max_detections=5,
                           embedding_cache_mb=0.0)
        engine = Engine.from_settings(settings)
        rows = [count_run(engine, 1), count_run(engine, batch)]
    return {"device": device, "card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "runs": rows,
            "uploads_intact": uploads_intact(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    figures = measure(args.device, args.batch)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    one, many = figures["runs"]
    grows = many["waits"] > one["waits"] or many.get("ours", 0) > 0 or one.get("ours", 0) > 0
    grows = grows or not figures["uploads_intact"]
    print(f"waits per batch: {one['waits']} at batch 1, {many['waits']} at batch {many['images']}; "
          f"device syncs from backend/: {many.get('ours', 0)}, from libraries: {many.get('library', 0)}; "
          f"uploads intact: {figures['uploads_intact']}")
    return 1 if grows else 0


if __name__ == "__main__":
    sys.exit(main())
