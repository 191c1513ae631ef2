"""Video tracking: frames/s and peak memory against video length and object count, ours vs the anchor.

Ours (``ours``): the streaming :class:`~backend.engine.tracker.TrackingSession` as the backend loads
it (``Pipeline(settings).video.tracker()``): frames decoded one by one from the encoded clip
(:class:`~backend.images.video.VideoSource`), every object followed by one model step per frame,
state older than the model's memory window dropped every ``chunk`` (32) frames, so memory should
stay flat in the video's length. With ``--end-to-end`` (default on cuda) also the whole video path,
``Pipeline(settings).video.track_source`` (``e2e``): the detector on the first frame and then every
second of video, its detections started as tracks. Thresholds 0 and NMS off, at most ``objects``
detections (the request's ``max_detections``, as a project's extra_params sets it) and
``VIDEO_MAX_OBJECTS`` = ``objects``: exactly that many tracks, later detections continue them or
are ignored, no backward runs.

The anchor (``anchor``), transformers' own way as LS's example backend uses it: the whole clip
decoded and preprocessed into one tensor, one ``Sam2VideoInferenceSession(video=...)`` per object
(a separate ``propagate_in_video_iterator`` per object: LS's example tracks one), nothing dropped,
each mask upsampled to the frame and its box found on the host. Same preprocessing and prompts as
ours (the tracker's own ``pixels``; the box as corner points), so the boxes must agree: the bench
checks them (``boxes equal``: share of object-frames whose boxes are identical).

Every configuration (way x frames x objects) runs in a subprocess of its own (on cuda: one process
for all, see ``--processes``) after loading the model and a 3-frame warm-up, and reports:

- frames/s: frames of the clip / wall time from the encoded bytes to every object's box on every
  frame (decode, preprocessing, model, masks to boxes); ``tracker frames/s``: frames / the time of
  the tracking steps alone (the model and its masks; ours: ``session.track``, the anchor: the
  propagation loops of all objects), decoding and preprocessing excluded; ``CPU s/frame``: the
  process's CPU time (all threads) per frame over the same span. Workers run with
  ``OMP_WAIT_POLICY=PASSIVE`` (the backend's worker default), so waiting threads do not spin and
  CPU time is work: on a CPU shared with other jobs its ratio is steadier than wall time's;
- peak RSS: the process's resident-set high-water mark (``VmHWM``, reset after loading and warm-up
  through ``/proc/self/clear_refs``; ``ru_maxrss``, whole process, is in the JSON), and
  ``RSS growth``: that peak minus the RSS after loading (meaningful with a process per config);
- held tensors: the peak bytes of the distinct tensor storages the tracking state holds (the
  session, its cache and outputs, ours' frame pixels, the anchor's video tensor), sampled every
  ``SAMPLE_EVERY`` frames (sampling time is not counted); on cuda also the peak GPU memory
  (``torch.cuda.max_memory_allocated``, reset before each run; ``above models``: minus what was
  allocated before it).

The CPU default uses the tiny sam2-video config at a 128-pixel input (``--tiny-size``; 256 is the
checkpoint ``make-tiny-models`` writes, 4x slower): its memory path keeps SAM 2.1's widths, so a
step costs ~15 ms of CPU even so, and 800 frames fit the run. cuda builds DINO-T and SAM 2.1-L at
real size with random weights (``--models-dir`` keeps them for the next run), or loads
``--tracker-model``/``--dino-model``.

    python bench/video.py --out video-cpu.json       # CPU: tiny, 320x240, 50/200/800 frames, 1 and 4 objects
    python bench/video.py --device cuda --models-dir /tmp/videom --out video.json   # 1080p, 1/5/10/20 objects
    python bench/video.py --device cpu --models real --lengths 8 --objects 1,3      # real size on a CPU

On the CPU absolute times mean little (shared cores, fp32); report the ratios. Timings are only
printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: LS's clock for the clips (the label config's frameRate); the clips are encoded at this rate.
FPS = 25
#: Held-tensor bytes are sampled every this many frames (and at the end of every propagation).
SAMPLE_EVERY = 8
#: The e2e run's prompt: DINO's phrases (random weights: any phrase gives boxes at threshold 0).
PHRASES = ("person", "car", "dog")
WAYS = ("ours", "anchor", "e2e")


# -- the parent: models, clips, configurations, table -----------------------------------------------

def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", choices=["tiny", "real"], default=None,
                        help="random-weight checkpoints to build (default: tiny on cpu, real on cuda)")
    parser.add_argument("--models-dir", type=Path, default=None, help="build models here, or reuse them")
    parser.add_argument("--tiny-size", type=int, default=128,
                        help="input side of the tiny tracker (256: the checkpoint make-tiny-models writes; the "
                             "default 128 is the same config at a quarter of the pixels, 4x faster on a CPU)")
    parser.add_argument("--tracker-model", default=None, help="SAM 2.1 video checkpoint (hub id or dir) instead")
    parser.add_argument("--dino-model", default=None, help="Grounding DINO checkpoint (hub id or dir) instead")
    parser.add_argument("--lengths", default=None, help="clip lengths in frames (default 50,200,800 cpu; 250 cuda)")
    parser.add_argument("--objects", default=None, help="object counts (default 1,4 cpu; 1,5,10,20 cuda)")
    parser.add_argument("--anchor-max-frames", type=int, default=None,
                        help="the anchor runs on at most this many frames of each clip (default: all on cpu, "
                             "50 on cuda, where it costs a propagation per object)")
    parser.add_argument("--size", default=None, help="frame WxH (default 320x240 cpu, 1920x1080 cuda)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=None,
                        help="also the whole path with the detector (default: on for cuda)")
    parser.add_argument("--ways", default="ours,anchor", help="comma-separated: ours, anchor, e2e (or --end-to-end)")
    parser.add_argument("--processes", choices=["per-config", "one"], default=None,
                        help="a subprocess per configuration (default on cpu: clean peak RSS) or one for all "
                             "(default on cuda: one model load and CUDA start-up)")
    parser.add_argument("--out", "--json", dest="out", type=Path, default=None, help="write the figures here (JSON)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return

    cuda = args.device == "cuda"
    models = args.models or ("real" if cuda else "tiny")
    lengths = _ints(args.lengths or ("250" if cuda else "50,200,800"))
    objects = _ints(args.objects or ("1,5,10,20" if cuda else "1,4"))
    width, height = (int(v) for v in (args.size or ("1920x1080" if cuda else "320x240")).lower().split("x"))
    anchor_max = args.anchor_max_frames or (50 if cuda else max(lengths))
    end_to_end = cuda if args.end_to_end is None else args.end_to_end
    ways = [w for w in args.ways.split(",") if w] + (["e2e"] if end_to_end else [])
    if unknown := [w for w in ways if w not in WAYS]:
        parser.error(f"unknown way(s) {unknown}: use ours, anchor, e2e")
    per_config = (args.processes or ("one" if cuda else "per-config")) == "per-config"
    _quiet()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models_dir = args.models_dir or work / "models"
        paths = build_models(models_dir, models, need_detector="e2e" in ways, tracker=args.tracker_model,
                             dino=args.dino_model, tiny_size=args.tiny_size)
        clips = {n: make_bench_clip(work / f"clip{n}.mp4", n, (width, height)) for n in lengths}
        configs, keys = [], set()
        for n in lengths:
            for k in objects:
                for way in ways:
                    frames = min(n, anchor_max) if way == "anchor" else n
                    if (way, frames, k) in keys:
                        continue
                    keys.add((way, frames, k))
                    configs.append({"way": way, "frames": frames, "objects": k, "clip": str(clips[n]),
                                    "size": [width, height], "boxes": str(work / f"boxes-{way}-{frames}-{k}.npy"),
                                    "device": args.device, "dtype": args.dtype, **paths})
        started = time.perf_counter()
        runs = run_configs(configs, work, per_config)
        for run, config in zip(runs, configs):
            run["boxes_file"] = config["boxes"]
        pairs = compare(runs)
        elapsed = time.perf_counter() - started
        for run in runs:
            run.pop("boxes_file")

    report = {
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
        "device": _device_name(args.device), "models": models if not args.tracker_model else args.tracker_model,
        "tracker": paths["tracker"] if args.tracker_model else
        f"sam2-video ({models}{f' at {args.tiny_size} px' if models == 'tiny' else ''}, random weights)",
        "dtype": args.dtype or ("bfloat16" if cuda else "float32"), "frame_size": f"{width}x{height}",
        "fps_clock": FPS, "processes": "per-config" if per_config else "one", "seconds": round(elapsed, 1),
        "runs": runs, "pairs": pairs,
    }
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def build_models(models_dir: Path, models: str, need_detector: bool, tracker: str | None, dino: str | None,
                 tiny_size: int = 256) -> dict:
    """Random-weight checkpoints (built once into ``models_dir/{tiny,real}``, reused when there) or
    the given ones. The video path uses only the detector of the image engine, which still loads a
    segmenter: a tiny SAM."""
    from backend.engine import tiny_video
    from backend.engine.tiny import build_real_size_grounding_dino, make_family_model, make_tiny_models

    tiny, real = models_dir / "tiny", models_dir / "real"
    chosen = real if models == "real" else tiny
    video_dir = real / "sam2-video" if models == "real" else tiny / f"sam2-video-{tiny_size}"
    if tracker is None and not (video_dir / "config.json").exists():
        if models == "real":
            make_family_model(real, "sam2-video", real_size=True)
        else:
            # The project's tiny config (make-tiny-models --family sam2-video) at another input side:
            # its builder reads the side from this module constant.
            default, tiny_video.TINY_SAM_SIZE = tiny_video.TINY_SAM_SIZE, tiny_size
            try:
                tiny_video.build_tiny_sam2_video(video_dir)
            finally:
                tiny_video.TINY_SAM_SIZE = default
    paths = {"tracker": tracker or str(video_dir), "dino": None, "sam": None}
    if need_detector:
        if not (tiny / "sam" / "config.json").exists():
            make_tiny_models(tiny)
        if dino is None and models == "real" and not (real / "grounding-dino" / "config.json").exists():
            build_real_size_grounding_dino(real / "grounding-dino")
        paths.update(dino=dino or str(chosen / "grounding-dino"), sam=str(tiny / "sam"))
    return paths


def object_boxes(count: int, width: int, height: int) -> np.ndarray:
    """``count`` XYXY pixel boxes on a grid under the clip's code row, each 60% of its cell."""
    from tests.videoclips import block_size

    top = block_size(width) + 2
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cell_w, cell_h = width / cols, (height - top) / rows
    boxes = []
    for i in range(count):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + 0.2 * cell_w, top + r * cell_h + 0.2 * cell_h
        boxes.append([x0, y0, x0 + 0.6 * cell_w, y0 + 0.6 * cell_h])
    return np.round(np.array(boxes, np.float64))


def make_bench_clip(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """An H.264 clip (tests/videoclips.py): the frame index burned in, a square moving across."""
    from tests.videoclips import block_size, make_clip

    width, height = size
    side = max(8, min(width, height) // 6)
    top = block_size(width) + 1
    span_x, span_y = width - side - 1, height - top - side - 1
    velocity = (max(0, span_x // max(1, frames - 1)) or 0, max(0, span_y // max(1, 2 * (frames - 1))) or 0)
    return make_clip(path, frames=frames, fps=FPS, size=size, square=(side, (0, top), velocity))


def run_configs(configs: list[dict], work: Path, per_config: bool) -> list[dict]:
    groups = [[c] for c in configs] if per_config else [configs]
    runs = []
    for g, group in enumerate(groups):
        spec, result = work / f"spec{g}.json", work / f"result{g}.json"
        spec.write_text(json.dumps({"configs": group, "result": str(result)}))
        for config in group:
            print(f"running {config['way']}: {config['frames']} frames, {config['objects']} objects ...",
                  file=sys.stderr, flush=True)
        # OMP_WAIT_POLICY=PASSIVE (the backend's worker default): threads that wait sleep instead of
        # spinning, so the CPU time measured is work, even when other jobs share the cores.
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)], env=env)
        finished = json.loads(result.read_text()) if result.exists() else []
        for config in group[len(finished):]:  # the worker died (exit code) before these
            finished.append({"way": config["way"], "frames": config["frames"], "objects": config["objects"],
                             "error": f"the worker exited with {done.returncode}"})
        runs.extend(finished)
    return runs


def compare(runs: list[dict]) -> list[dict]:
    """Ours against the anchor (and e2e) for each (frames, objects): ratios and box agreement."""
    by_key = {(r["way"], r["frames"], r["objects"]): r for r in runs if "error" not in r}
    pairs = []
    for (way, frames, objects), ours in by_key.items():
        if way != "ours":
            continue
        pair = {"frames": frames, "objects": objects}
        anchor = next((r for (w, f, k), r in sorted(by_key.items(), key=lambda kv: -kv[0][1])
                       if w == "anchor" and k == objects and f <= frames), None)
        if anchor is not None:
            pair.update(anchor_frames=anchor["frames"],
                        speedup=round(ours["fps"] / anchor["fps"], 2),
                        cpu_speedup=round(anchor["cpu_s_per_frame"] / ours["cpu_s_per_frame"], 2),
                        tracker_speedup=round(ours["tracker_fps"] / anchor["tracker_fps"], 2),
                        rss_growth_ratio=_ratio(anchor["rss_growth_mb"], ours["rss_growth_mb"]),
                        held_ratio=_ratio(anchor["held_mb"], ours["held_mb"]))
            if "gpu_peak_mib" in ours:
                pair["gpu_above_models_ratio"] = _ratio(anchor["gpu_above_models_mib"], ours["gpu_above_models_mib"])
            pair.update(agreement(np.load(ours["boxes_file"])[:anchor["frames"]], np.load(anchor["boxes_file"])))
        e2e = by_key.get(("e2e", frames, objects))
        if e2e is not None:
            pair["e2e_over_tracker_fps"] = round(e2e["fps"] / ours["fps"], 2)
        pairs.append(pair)
    return pairs


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def agreement(ours: np.ndarray, anchor: np.ndarray) -> dict:
    """(F, N, 4) boxes (NaN: not visible) → share of identical object-frames and their mean box IoU."""
    same = np.all((ours == anchor) | (np.isnan(ours) & np.isnan(anchor)), axis=-1)
    both = ~np.isnan(ours[..., 0]) & ~np.isnan(anchor[..., 0])
    a, b = ours[both], anchor[both]
    inter = (np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None) *
             np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None))
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 1.0)
    return {"boxes_equal": round(float(same.mean()), 4),
            "box_iou_mean": round(float(iou.mean()), 4) if len(iou) else None,
            "visible_ours": round(float((~np.isnan(ours[..., 0])).mean()), 4),
            "visible_anchor": round(float((~np.isnan(anchor[..., 0])).mean()), 4)}


def table(report: dict) -> str:
    gpu = any("gpu_peak_mib" in r for r in report["runs"])
    head = ["way", "frames", "objects", "frames/s", "tracker frames/s", "CPU s/frame", "peak RSS MB",
            "RSS growth MB", "held tensors MB"] + (["peak GPU MiB", "GPU above models MiB"] if gpu else [])
    lines = [f"{report['device']}; tracker {report['tracker']}, {report['dtype']}, frames {report['frame_size']}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {w: i for i, w in enumerate(WAYS)}
    for r in sorted(report["runs"], key=lambda r: (r["objects"], r["frames"], order[r["way"]])):
        if "error" in r:
            lines.append(f"| {r['way']} | {r['frames']} | {r['objects']} | failed: {r['error']} |")
            continue
        way = f"{r['way']} ({r['tracks']} track{'s' * (r['tracks'] != 1)})" if "tracks" in r else r["way"]
        row = [way, r["frames"], r["objects"], f"{r['fps']:.3g}", f"{r['tracker_fps']:.3g}",
               f"{r['cpu_s_per_frame']:.3g}", f"{r['rss_peak_mb']:.0f}", f"{r['rss_growth_mb']:.0f}",
               f"{r['held_mb']:.1f}"]
        if gpu:
            row += [f"{r.get('gpu_peak_mib', 0):.0f}", f"{r.get('gpu_above_models_mib', 0):.0f}"]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    pairs = [p for p in report["pairs"] if "speedup" in p]
    if pairs:
        lines += ["", "| frames (anchor) | objects | speed-up | speed-up by CPU time | tracker speed-up | "
                      "RSS growth anchor/ours | held tensors anchor/ours | boxes equal | box IoU mean |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {p['frames']} ({p['anchor_frames']}) | {p['objects']} | {p['speedup']}x | "
                         f"{p['cpu_speedup']}x | {p['tracker_speedup']}x | {p['rss_growth_ratio']} | "
                         f"{p['held_ratio']} | "
                         f"{p['boxes_equal']} | {p['box_iou_mean']} |")
    return "\n".join(lines)


# -- the worker: one process, one model, the configurations it is given ---------------------------

def worker(spec: dict) -> None:
    import torch

    _quiet()
    configs = spec["configs"]
    first = configs[0]
    device = torch.device(first["device"])
    settings = _settings(first, max(c["objects"] for c in configs))
    from backend.pipeline.predict import Pipeline

    pipeline = Pipeline(settings)
    tracker = pipeline.video.tracker()  # build_tracker: TRACKER_MODEL on the device, as the backend loads it
    if any(c["way"] == "e2e" for c in configs):
        pipeline.engine()
    width, height = first["size"]
    for count in sorted({c["objects"] for c in configs}):
        _warm_up(tracker, width, height, count)
    if any(c["way"] == "e2e" for c in configs):
        from PIL import Image

        pipeline.engine().detect([Image.new("RGB", (width, height))], [PHRASES])
    results = []
    for config in configs:
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        rss_base = _rss_kb("VmRSS")
        hwm_reset = _reset_hwm()
        try:
            run = {"ours": run_ours, "anchor": run_anchor, "e2e": run_e2e}[config["way"]](
                config, tracker, pipeline, device)
        except Exception as exc:  # noqa: BLE001 - one configuration (say, out of memory) must not lose the others
            print(f"  {config['way']}: {config['frames']} frames, {config['objects']} objects: failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            results.append({"way": config["way"], "frames": config["frames"], "objects": config["objects"],
                            "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            Path(spec["result"]).write_text(json.dumps(results))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        run.update(way=config["way"], frames=config["frames"], objects=config["objects"],
                   rss_after_load_mb=round(rss_base / 1024, 1),
                   rss_peak_mb=round((_rss_kb("VmHWM") if hwm_reset else _maxrss_kb()) / 1024, 1),
                   ru_maxrss_mb=round(_maxrss_kb() / 1024, 1), hwm_reset=hwm_reset)
        run["rss_growth_mb"] = round(run["rss_peak_mb"] - run["rss_after_load_mb"], 1)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            run.update(gpu_peak_mib=round(peak / 2**20, 1), gpu_above_models_mib=round((peak - base_gpu) / 2**20, 1))
        results.append(run)
        Path(spec["result"]).write_text(json.dumps(results))  # what is done survives a later failure
        gpu = f", GPU peak {run['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in run else ""
        print(f"  {run['way']}: {run['frames']} frames, {run['objects']} objects: {run['fps']:.3g} frames/s "
              f"(tracker {run['tracker_fps'] or 0:.3g}), held {run['held_mb']:.1f} MB, RSS growth "
              f"{run['rss_growth_mb']:.0f} MB{gpu}", file=sys.stderr, flush=True)


def _settings(config: dict, objects: int):
    from backend.settings import Settings

    return Settings(grounding_dino_model=config["dino"] or "unused", sam_model=config["sam"] or "unused",
                    tracker_model=config["tracker"], device=config["device"], dtype=config["dtype"],
                    box_threshold=0.0, text_threshold=0.0, nms_threshold=1.0, max_detections=objects,
                    video_max_objects=objects, embedding_cache_mb=0.0, preload_models=False, prewarm_tasks=0)


def _warm_up(tracker, width: int, height: int, objects: int) -> None:
    """A few frames through a throw-away session: kernels chosen, allocator primed."""
    rng = np.random.default_rng(0)
    session = tracker.session(width, height)
    session.prompt_boxes(0, list(range(objects)), object_boxes(objects, width, height))
    for frame in range(3):
        session.track(frame, rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class HeldMemory:
    """Peak bytes of the distinct tensor storages reachable from the tracking state."""

    def __init__(self):
        self.peak, self.seconds, self.cpu = 0, 0.0, 0.0

    def sample(self, *roots) -> None:
        import torch
        from transformers.models.sam2_video.modeling_sam2_video import (
            Sam2VideoInferenceCache,
            Sam2VideoInferenceSession,
        )

        started, cpu = time.perf_counter(), time.process_time()
        storages: dict[tuple, int] = {}
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                storages[(storage.device.type, storage.data_ptr())] = storage.nbytes()
                continue
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple, set)):
                stack.extend(item)
            elif isinstance(item, (Sam2VideoInferenceSession, Sam2VideoInferenceCache)):
                stack.extend(vars(item).values())
        self.peak = max(self.peak, sum(storages.values()))
        self.seconds += time.perf_counter() - started
        self.cpu += time.process_time() - cpu


def _boxes_array(frames: int, objects: int) -> np.ndarray:
    return np.full((frames, objects, 4), np.nan, np.float32)


def run_ours(config: dict, tracker, pipeline, device) -> dict:
    from backend.images.video import VideoSource
    from backend.pipeline.videotrack import VISIBLE_SCORE

    frames, objects = config["frames"], config["objects"]
    data = Path(config["clip"]).read_bytes()
    boxes = _boxes_array(frames, objects)
    held = HeldMemory()
    prep = track = 0.0
    started, cpu = time.perf_counter(), time.process_time()
    source = VideoSource(data, fps=FPS)
    width, height = source.info.width, source.info.height
    session = tracker.session(width, height)
    session.prompt_boxes(1, list(range(objects)), object_boxes(objects, width, height))
    for frame in source.frames(1, frames):
        t0 = time.perf_counter()
        session.add_frame(frame.frame, frame.image)
        _sync(device)
        t1 = time.perf_counter()
        result = session.track(frame.frame)
        _sync(device)
        t2 = time.perf_counter()
        prep, track = prep + (t1 - t0), track + (t2 - t1)
        for obj, mask, score in zip(result.ids, result.masks, result.scores):
            if score > VISIBLE_SCORE and not mask.is_empty:
                boxes[frame.frame - 1, obj] = mask.box()
        if frame.frame % SAMPLE_EVERY == 0 or frame.frame == frames:
            held.sample(session._pixels, session.state)
    total, cpu = time.perf_counter() - started - held.seconds, time.process_time() - cpu - held.cpu
    source.close()
    np.save(config["boxes"], boxes)
    return _figures(frames, total, cpu, track, prep, held, held_frames=session.held_frames())


def run_anchor(config: dict, tracker, pipeline, device) -> dict:
    """transformers' whole-clip session, one object (one propagation) at a time."""
    import torch
    import torch.nn.functional as F
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    from backend.images.video import VideoSource
    from backend.pipeline.videotrack import VISIBLE_SCORE

    frames, objects = config["frames"], config["objects"]
    data = Path(config["clip"]).read_bytes()
    boxes = _boxes_array(frames, objects)
    held = HeldMemory()
    prep = track = 0.0
    side = tracker.square
    started, cpu = time.perf_counter(), time.process_time()
    source = VideoSource(data, fps=FPS)
    width, height = source.info.width, source.info.height
    # The whole clip, preprocessed, in one tensor (filled in place: no second copy while stacking).
    video = torch.empty((frames, 3, side, side), dtype=tracker.dtype, device=device)
    for frame in source.frames(1, frames):
        t0 = time.perf_counter()
        video[frame.frame - 1] = tracker.pixels(frame.image)
        _sync(device)
        prep += time.perf_counter() - t0
    source.close()
    scale = np.array([side / width, side / height] * 2)
    with torch.inference_mode():
        for obj, box in enumerate(object_boxes(objects, width, height)):
            t0 = time.perf_counter()
            session = Sam2VideoInferenceSession(video=video, video_height=height, video_width=width,
                                                inference_device=device, inference_state_device=device,
                                                video_storage_device=device, dtype=tracker.dtype)
            obj_idx = session.obj_id_to_idx(obj)
            session.add_point_inputs(obj_idx, 0, {
                "point_coords": torch.tensor((box * scale).reshape(1, 1, 2, 2), dtype=torch.float32),
                "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})
            session.obj_with_new_inputs = [obj]
            stream = tracker.model.propagate_in_video_iterator(session, start_frame_idx=0)
            track += time.perf_counter() - t0
            while True:
                t0 = time.perf_counter()
                output = next(stream, None)
                if output is None:
                    track += time.perf_counter() - t0
                    break
                # The mask at the frame's size, to the host, its box there (LS's example: mask → bbox).
                logits = output.pred_masks[:, 0, None].float()
                mask = (F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)[0, 0] > 0)
                mask = mask.cpu().numpy()
                score = torch.sigmoid(output.object_score_logits.float().reshape(-1))[0].item()
                if score > VISIBLE_SCORE and mask.any():
                    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                    boxes[output.frame_idx, obj] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
                _sync(device)
                track += time.perf_counter() - t0
                if (output.frame_idx + 1) % SAMPLE_EVERY == 0 or output.frame_idx == frames - 1:
                    held.sample(session, video)
            del session, stream
    total, cpu = time.perf_counter() - started - held.seconds, time.process_time() - cpu - held.cpu
    np.save(config["boxes"], boxes)
    return _figures(frames, total, cpu, track, prep, held)


def run_e2e(config: dict, tracker, pipeline, device) -> dict:
    """The whole video path: ``Pipeline.video.track_source`` (detector + tracker) on the clip."""
    from backend.engine import tracker as tracker_module
    from backend.images.video import VideoSource
    from backend.ls.labelconfig import parse_label_config
    from backend.ls.options import PredictOptions
    from backend.ls.tasks import PredictRequest
    from backend.cli_video import video_config_for_phrases

    frames, objects = config["frames"], config["objects"]
    data = Path(config["clip"]).read_bytes()
    held = HeldMemory()
    times = {"track": 0.0, "prep": 0.0}
    cls = tracker_module.TrackingSession
    original_track, original_add = cls.track, cls.add_frame

    calls = {"track": 0}

    def timed(key, fn):
        def wrapper(self, *a, **kw):
            t0 = time.perf_counter()
            out = fn(self, *a, **kw)
            _sync(device)
            times[key] += time.perf_counter() - t0
            if key == "track":
                calls[key] += 1
                if calls[key] % SAMPLE_EVERY == 0:
                    held.sample(self._pixels, self.state)
            return out
        return wrapper

    cls.track, cls.add_frame = timed("track", original_track), timed("prep", original_add)
    # Exactly ``objects`` tracks: that many detections on the first frame (the request's
    # max_detections, as a project's extra_params would set it) and VIDEO_MAX_OBJECTS at that count,
    # so later detections continue tracks or are ignored (no backward runs).
    options = PredictOptions(max_detections=objects)
    request = PredictRequest(tasks=[{"id": None, "data": {}}], config=parse_label_config(
        video_config_for_phrases(list(PHRASES), FPS)), context=None, options=options, bulk=True)
    pipeline.video.settings = replace(pipeline.settings, video_max_objects=objects)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        source = VideoSource(data, fps=FPS, max_frames=frames)
        tracks, tracked = pipeline.video.track_source(source, request, PHRASES, fps=FPS)
        total, cpu = time.perf_counter() - started - held.seconds, time.process_time() - cpu - held.cpu
        source.close()
    finally:
        cls.track, cls.add_frame = original_track, original_add
    figures = _figures(frames, total, cpu, times["track"], times["prep"], held)
    figures.update(tracks=len(tracks.tracks), frames_tracked=tracked)
    return figures


def _figures(frames: int, total: float, cpu: float, track: float, prep: float, held: HeldMemory, **extra) -> dict:
    return {"seconds": round(total, 3), "fps": round(frames / total, 4), "cpu_s_per_frame": round(cpu / frames, 4),
            "tracker_fps": round(frames / track, 4) if track else None,
            "prep_ms_per_frame": round(1000 * prep / frames, 2), "held_mb": round(held.peak / 2**20, 2), **extra}


if __name__ == "__main__":
    main()
