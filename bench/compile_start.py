"""COMPILE=1 start-up, cold then warm: seconds from a fresh process to an engine that is ready.

Starts a fresh Python process twice with COMPILE=1 and the same COMPILE_CACHE_DIR, empty before the
first start. Each one builds the engine the way a worker does (``build_engine(Settings.from_env())``:
load, regional compile, every batch bucket run once) and then runs one request of one image and one
of a full batch. Per start it reports the seconds from spawning the process to the engine being
ready (imports, weights, compile included), the compile/warm-up part of it, the first requests'
seconds, graphs compiled after ready (0: ready means compiled), and the Inductor FX graph cache and
AOTAutograd cache hits and misses (``torch._dynamo.utils.counters``). The first start fills the
cache (misses), the second should only hit it.

Random-weight checkpoints (speed does not depend on weight values): tiny ones on the CPU, real-size
Grounding DINO-T + SAM ViT-H (or SAM 3 with ``--engine sam3``) on CUDA by default.

    python bench/compile_start.py --device cuda --models-dir /tmp/models --json OUT   # real models, batch 8
    python bench/compile_start.py --device cpu --engine sam3 --batch-size 1            # ~45 s on 2 cores
    python bench/compile_start.py --device cpu                                         # ~3.5 min on 2 cores

``--budget S`` bounds both starts together: a start still compiling when it runs out is stopped and
reported as timed out (the figures of the other start stay).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
#: The line of the child's stdout that carries its figures (the rest of its output is logs).
RESULT_PREFIX = "COMPILE_START_RESULT "
#: Environment that would point a start at another cache (not the empty one under test).
FOREIGN_CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE")


def engine_env(engine: str, models_dir: Path, device: str, batch_size: int, cache_dir: Path) -> dict[str, str]:
    """The settings of one start: COMPILE=1, the cache folder, the checkpoints under ``models_dir``
    (``grounding-dino`` + ``sam``, or ``sam3``), thresholds 0 so the requests find something."""
    env = {"COMPILE": "1", "COMPILE_CACHE_DIR": str(cache_dir), "DEVICE": device, "BATCH_SIZE": str(batch_size),
           "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5", "EMBEDDING_CACHE_MB": "0"}
    if engine == "sam3":
        env.update(ENGINE="sam3", SAM3_MODEL=str(models_dir / "sam3"))
    else:
        env.update(GROUNDING_DINO_MODEL=str(models_dir / "grounding-dino"), SAM_MODEL=str(models_dir / "sam"))
    return env


def start_once(env: dict[str, str], timeout: float) -> dict:
    """Spawn ``compile_start.py --child`` with ``env`` over this process's environment (minus any
    other compile cache); → its figures plus ``ready_s`` (spawn → engine ready, wall seconds), or
    ``{"timed_out": True, ...}`` when it did not finish within ``timeout`` seconds.

    Raises RuntimeError (with the end of its log) when the child fails."""
    full = {k: v for k, v in os.environ.items() if k not in FOREIGN_CACHE_ENV}
    full.update(env, PYTHONUNBUFFERED="1")
    spawned = time.time()
    # Its own process group: a timeout stops Inductor's compile workers with it.
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child"], cwd=REPO, env=full,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"timed_out": True, "after_s": round(time.time() - spawned, 1)}
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"the start exited with {process.returncode} and no result:\n{stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["ready_s"] = round(result.pop("ready_at") - spawned, 2)
    return result


def folder_size(folder: Path) -> dict:
    """Files and MiB under ``folder`` (what a start left in the cache)."""
    files = [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []
    return {"files": len(files), "mib": round(sum(path.stat().st_size for path in files) / 2**20, 1)}


def child() -> None:
    """One start, in this fresh process: build the engine from the environment, run a request of
    one image and one of a full batch, print the figures as one ``RESULT_PREFIX`` JSON line."""
    started = time.time()
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    compile_seconds: list[float] = []

    class WarmTime(logging.Handler):  # warm_buckets logs its seconds last: keep them
        def emit(self, record: logging.LogRecord) -> None:
            if "compiled and warmed" in str(record.msg) and record.args:
                compile_seconds.append(float(record.args[-1]))

    logging.getLogger("backend.engine.compiling").addHandler(WarmTime())
    import torch
    from PIL import Image
    from torch._dynamo.utils import counters

    from backend.engine.engine import build_engine
    from backend.settings import Settings

    imported = time.time()
    settings = Settings.from_env()
    engine = build_engine(settings)
    ready = time.time()
    graphs = counters["stats"]["unique_graphs"]
    landscape = Image.new("RGB", (640, 480), (90, 120, 150))
    first = time.perf_counter()
    engine.run([landscape], [["object"]])
    engine.run([landscape] * engine.batch_size, [["object"]] * engine.batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    result = {
        "ready_at": ready,
        "imports_s": round(imported - started, 2),
        "build_engine_s": round(ready - imported, 2),
        "compile_and_warm_s": round(sum(compile_seconds), 2) if compile_seconds else None,
        "first_requests_s": round(time.perf_counter() - first, 2),
        "graphs": graphs,
        "graphs_after_ready": counters["stats"]["unique_graphs"] - graphs,
        "inductor": {k: v for k, v in counters["inductor"].items() if "cache" in k},
        "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
        "cache_folder": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "batch_size": engine.batch_size,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def headline(report: dict) -> str:
    """One line: each start's seconds to ready, its compile part and its FX graph cache counts."""
    parts = []
    for name in ("cold", "warm"):
        start = report[name]
        if start.get("timed_out"):
            parts.append(f"{name}: not ready after {start['after_s']} s")
            continue
        cache = start["inductor"]
        parts.append(f"{name}: ready in {start['ready_s']} s (compile+warm {start['compile_and_warm_s']} s, "
                     f"FX cache {cache.get('fxgraph_cache_hit', 0)} hits / {cache.get('fxgraph_cache_miss', 0)} "
                     f"misses, {start['graphs_after_ready']} graphs after ready)")
    return f"{report['engine']} {report['models']} batch {report['batch_size']} on {report['device']}: " + "; ".join(parts)


def build_models(models_dir: Path, engine: str, real: bool) -> None:
    """Random-weight checkpoints under ``models_dir``, unless they are there already."""
    from backend.engine.tiny import make_family_model, make_real_size_models, make_tiny_models

    if engine == "sam3":
        if not (models_dir / "sam3" / "config.json").exists():
            make_family_model(models_dir, "sam3", real_size=real)
    elif not (models_dir / "sam" / "config.json").exists() or not (models_dir / "grounding-dino").exists():
        (make_real_size_models if real else make_tiny_models)(models_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--engine", choices=["grounded-sam", "sam3"], default="grounded-sam")
    parser.add_argument("--models", choices=["tiny", "real"], default=None,
                        help="random-weight checkpoints to build (default: tiny on cpu, real on cuda)")
    parser.add_argument("--models-dir", type=Path, default=None, help="build models here, or reuse them")
    parser.add_argument("--batch-size", type=int, default=8, help="BATCH_SIZE of the starts (buckets 1 and it)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="COMPILE_CACHE_DIR to use (must be empty or absent; default: a temporary one)")
    parser.add_argument("--budget", type=float, default=1200.0, help="seconds for both starts together")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        child()
        return
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: use 1 or more")
    if args.cache_dir is not None and args.cache_dir.exists() and any(args.cache_dir.iterdir()):
        parser.error(f"--cache-dir {args.cache_dir} is not empty: a cold start needs an empty cache; "
                     "give a new folder or leave the option out")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    real = (args.models or ("real" if device == "cuda" else "tiny")) == "real"
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or Path(tmp) / "models"
        built = time.perf_counter()
        build_models(models_dir, args.engine, real)
        models_build_s = round(time.perf_counter() - built, 1)  # ~0 when --models-dir held them
        cache_dir = args.cache_dir or Path(tmp) / "compile-cache"
        env = engine_env(args.engine, models_dir, device, args.batch_size, cache_dir)
        deadline = time.monotonic() + args.budget
        starts = {}
        for name in ("cold", "warm"):
            left = deadline - time.monotonic()
            starts[name] = start_once(env, left) if left > 1 else {"timed_out": True, "after_s": 0.0}
            starts[name]["cache_after"] = folder_size(cache_dir)
            print(f"{name}: {json.dumps(starts[name])}", file=sys.stderr, flush=True)
        report = {
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
            "device": torch.cuda.get_device_name(0) if device == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "engine": args.engine, "models": "real" if real else "tiny",
            "batch_size": args.batch_size, "models_build_s": models_build_s, **starts,
        }
        if "ready_s" in starts["cold"] and "ready_s" in starts["warm"]:
            report["warm_over_cold"] = round(starts["warm"]["ready_s"] / starts["cold"]["ready_s"], 3)
    print(json.dumps(report, indent=2))
    print(headline(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
