"""``python -m backend COMMAND``: serve, worker, prelabel, predict (image → LS JSON + overlay PNG),
make-tiny-models."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from backend.bulk.request import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK

log = logging.getLogger("backend")

from backend.cli_video import PALETTE


#: The CLI's region kinds (``--outputs``), each with the control its label config gets. The default
#: is rectangles and brush masks, what the JSON always held; polygons and bitmasks are asked for by name.
CLI_CONTROLS = {"rectangle": ("RectangleLabels", "label"), "brush": ("BrushLabels", "mask"),
                "polygon": ("PolygonLabels", "polygon"), "bitmask": ("BitmaskLabels", "bitmask")}
DEFAULT_OUTPUTS = ("rectangle", "brush")


def parse_outputs(text: str) -> tuple[str, ...]:
    """``--outputs``: 'rectangle,brush,polygon,bitmask' → the kinds, in that order, each once."""
    kinds = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CLI_CONTROLS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more of {', '.join(CLI_CONTROLS)}, "
                                         "separated by commas")
    return tuple(k for k in CLI_CONTROLS if k in kinds)


def _config_for_phrases(phrases: list[str], outputs: tuple[str, ...] = DEFAULT_OUTPUTS) -> str:
    """A label config whose labels are the prompt phrases, with one control per kind of ``outputs``,
    so the output is importable LS JSON (a project with the same controls takes it as is)."""
    from xml.sax.saxutils import quoteattr

    labels = "".join(f"<Label value={quoteattr(p)}/>" for p in phrases)
    controls = "".join(f'<{tag} name="{name}" toName="image">{labels}</{tag}>'
                       for tag, name in (CLI_CONTROLS[kind] for kind in outputs))
    return f'<View><Image name="image" value="$image"/>{controls}</View>'


def _label(region: dict) -> str:
    """A region's label: ``value.rectanglelabels[0]``, ``value.brushlabels[0]``, ... by its type."""
    return (region["value"].get(region["type"]) or [""])[0]


def draw_overlay(image, prediction: dict):
    """The image with each region drawn: masks tinted, polygons and boxes outlined in their label's
    colour, labels written at the boxes (at the polygons when there are no boxes)."""
    from PIL import Image, ImageDraw

    from backend.bitmask import png_to_mask
    from backend.ls.geometry import PercentRect, percent_to_pixels
    from backend.rle import rle_to_mask

    canvas = image.convert("RGBA")
    tint = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw_tint = ImageDraw.Draw(tint)
    labels = sorted({_label(r) for r in prediction["result"]})
    color = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    for region in prediction["result"]:
        size = region.get("original_height"), region.get("original_width")
        if region["type"] == "brushlabels":
            mask = rle_to_mask(region["value"]["rle"], *size)
        elif region["type"] == "bitmasklabels":
            mask = png_to_mask(region["value"]["imageDataURL"], *size)
        else:
            continue
        alpha = Image.fromarray((mask * 110).astype("uint8"), "L")
        tint.paste(color[_label(region)] + (110,), (0, 0), alpha)
    canvas = Image.alpha_composite(canvas, tint)
    draw = ImageDraw.Draw(canvas)
    has_boxes = any(r["type"] == "rectanglelabels" for r in prediction["result"])
    for region in prediction["result"]:
        if region["type"] != "polygonlabels" or len(region["value"].get("points") or ()) < 3:
            continue
        value, w, h = region["value"], region["original_width"], region["original_height"]
        points = [percent_to_pixels(x, y, w, h) for x, y in value["points"]]
        label = value["polygonlabels"][0]
        draw.polygon(points, outline=color[label] + (255,), width=max(2, w // 400))
        if not has_boxes:  # --outputs polygon: the label sits at the polygon's top vertex
            x0, y0 = min(points, key=lambda p: (p[1], p[0]))
            draw.text((x0 + 3, y0 + 2), f"{label} {region['score']:.2f}", fill=color[label] + (255,))
    for region in prediction["result"]:
        if region["type"] != "rectanglelabels":
            continue
        value, w, h = region["value"], region["original_width"], region["original_height"]
        rect = PercentRect(value["x"], value["y"], value["width"], value["height"], value.get("rotation", 0))
        corners = rect.corners(w, h)
        label = value["rectanglelabels"][0]
        draw.polygon(corners, outline=color[label] + (255,), width=max(2, w // 400))
        x0, y0 = corners[0]  # the label sits at the rectangle's own top-left corner
        draw.text((x0 + 3, y0 + 2), f"{label} {region['score']:.2f}", fill=color[label] + (255,))
    del draw_tint
    return canvas.convert("RGB")


def cmd_predict(args) -> int:
    from backend.images.decode import ImageError, LoadedImage
    from backend.ls.labelconfig import parse_label_config
    from backend.pipeline.predict import Pipeline
    from backend.settings import Settings
    from backend.ls.tasks import PromptLimits, split_prompt

    settings = Settings.from_env()
    phrases = split_prompt(args.prompt, PromptLimits(settings.max_prompt_chars, settings.max_prompt_phrases))
    if not phrases:
        print("error: --prompt has no phrases; separate them with '.', ',' or '?'", file=sys.stderr)
        return 2
    from backend.cli_video import is_video_path, predict_video, write_outputs

    if is_video_path(args.image):
        if args.outputs is not None:
            print("error: --outputs is for images: a video's regions are videorectangle tracks", file=sys.stderr)
            return 2
        return predict_video(args, settings, phrases)
    try:
        image = LoadedImage.from_bytes(Path(args.image).read_bytes(), str(args.image), settings.max_image_pixels)
    except (OSError, ImageError) as exc:
        print(f"error: cannot read {args.image}: {exc}", file=sys.stderr)
        return 2
    from backend.ls.regions import build_prediction

    pipeline = Pipeline(settings)
    result = pipeline.engine().run([image.image], [phrases])[0]
    config = parse_label_config(_config_for_phrases(phrases, args.outputs or DEFAULT_OUTPUTS))
    prediction, stats = build_prediction(result, config, pipeline.model_version, defaults=pipeline.select_defaults,
                                         polygon=pipeline.polygon)
    print(f"{args.image}: {image.width}x{image.height}, {len(result.detections)} detections, "
          f"{stats.regions} regions ({pipeline.model_version})")
    write_outputs(args, prediction, lambda path: draw_overlay(image.image, prediction).save(path))
    return 0


def cmd_make_tiny_models(args) -> int:
    from backend.engine.tiny import make_family_model, make_tiny_models

    if args.family:
        path = make_family_model(args.dir, args.family, seed=args.seed)
        setting = {"sam3": "ENGINE=sam3 SAM3_MODEL", "sam3-video": "ENGINE=sam3 SAM3_MODEL",
                   "mm-grounding-dino": "GROUNDING_DINO_MODEL", "sam2-video": "TRACKER_MODEL"}.get(args.family, "SAM_MODEL")
        print(f"wrote {path}")
        print(f"use it with: {setting}={path}")
        return 0
    dino, sam = make_tiny_models(args.dir, seed=args.seed)
    print(f"wrote {dino} and {sam}")
    print(f"use them with: GROUNDING_DINO_MODEL={dino} SAM_MODEL={sam}")
    return 0


def cmd_serve(args) -> int:
    from backend.settings import Settings
    from backend.web.app import app_from_settings

    settings = Settings.from_env()
    app_from_settings(settings).run(host=args.host, port=args.port or settings.port, threaded=True,
                                    use_reloader=False)
    return 0


def cmd_worker(args) -> int:
    from backend.settings import Settings
    from backend.modes.worker import run_worker

    settings = Settings.from_env()
    run_worker(settings, [q.strip() for q in args.queues.split(",") if q.strip()],
               batch_size=args.batch_size, burst=args.burst, metrics_port=args.metrics_port,
               metrics_host=args.metrics_host, threads=args.threads or settings.worker_threads)
    return 0


def cmd_prelabel(args) -> int:
    from backend.bulk.request import PrelabelError, RunRequest
    from backend.ls.client import LabelStudioApiError
    from backend.modes.factory import build_backend
    from backend.modes.projects import for_run
    from backend.queue.errors import QueueError
    from backend.settings import Settings

    settings = Settings.from_env()
    if not settings.has_label_studio_credentials:
        print(f"error: {Settings.LS_CREDENTIALS_NEEDED}", file=sys.stderr)
        return 2
    try:
        run = RunRequest(project=args.project, prompt=args.prompt, chunk=args.chunk, redo=args.redo,
                         model_version=args.model_version)
        backend = build_backend(settings)
        # the project's options and default prompt (stored by the web processes: Redis in queue mode)
        run = for_run(backend.projects, run)
        status = backend.runs.run(run, progress=True)
    except (PrelabelError, LabelStudioApiError, QueueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run {status.id}: {status.status}, {status.done} done, {status.failed} failed of {status.total}")
    for task_id, reason in list(status.failures.items())[:20]:
        print(f"  task {task_id}: {reason}")
    return 0 if status.status == "done" else 1


def cmd_warm(args) -> int:
    """Ask the running backend to encode a project's next tasks now, through ``POST /warm`` with the
    backend's basic auth: embedded mode encodes in the process whose cache the clicks hit; queue
    mode sends the request to every worker (each has its own cache)."""
    import requests

    from backend.settings import Settings

    settings = Settings.from_env()
    url = (args.url or f"http://localhost:{settings.port}").rstrip("/") + "/warm"
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    body = {"project": args.project, "tasks": args.tasks or settings.prewarm_tasks or 3}
    if args.after is not None:
        body["after"] = args.after
    try:
        answer = requests.post(url, json=body, auth=auth, timeout=args.timeout)
    except requests.RequestException as exc:
        print(f"error: cannot reach the backend at {url} ({type(exc).__name__}): start it or pass --url",
              file=sys.stderr)
        return 2
    if answer.status_code != 200:
        message = answer.json().get("message") if answer.headers.get("content-type", "").startswith(
            "application/json") else answer.reason
        print(f"error: {url} answered {answer.status_code}: {message}", file=sys.stderr)
        return 2
    body = answer.json()
    if "workers" in body:  # queue mode: the workers encode in the background
        print(f"project {args.project}: sent to {body['workers']} worker(s), which encode in the background")
    else:
        print(f"project {args.project}: {body['encoded']} embeddings encoded")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="run the models on one image or video file")
    predict.add_argument("image", help="path of an image file, or of a video file (.mp4, .mov, .webm, ...)")
    predict.add_argument("--prompt", required=True,
                         help='phrases separated by ".", "," or "?", e.g. "cat . red car"')
    predict.add_argument("--outputs", type=parse_outputs, default=None, metavar="KINDS",
                         help="images: the region kinds to write, comma-separated, of rectangle, brush, polygon, "
                              "bitmask (default rectangle,brush). Each kind is a control of the JSON's label config: "
                              'RectangleLabels "label", BrushLabels "mask", PolygonLabels "polygon" (the mask\'s '
                              'outline, simplified at POLYGON_TOLERANCE), BitmaskLabels "bitmask" (the mask as a '
                              'PNG), all on Image "image"')
    predict.add_argument("--json", help="write the LS prediction JSON here")
    predict.add_argument("--overlay", help="write a PNG with boxes, polygons, masks and labels drawn here (a video: "
                                           "an MP4 with the tracks drawn, or a strip of frames for .png/.jpg)")
    predict.add_argument("--fps", type=float, default=25.0,
                         help="video: the frame rate LS numbers frames at (the label config's frameRate)")
    predict.set_defaults(func=cmd_predict)

    tiny = commands.add_parser("make-tiny-models", help="build tiny random-weight models for tests")
    tiny.add_argument("dir", help="writes DIR/grounding-dino and DIR/sam (with --family F: DIR/F)")
    tiny.add_argument("--family", choices=["sam-hq", "sam2", "sam3", "sam3-video", "mm-grounding-dino", "sam2-video"],
                      default=None,
                      help="build one checkpoint of this family instead of the default pair")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny_models)

    worker = commands.add_parser("worker", help="serve the RQ queues with resident models (needs REDIS_URL)")
    worker.add_argument("--queues", default="interactive,prelabel", help="in priority order")
    worker.add_argument("--batch-size", type=int, default=None, help="images per GPU batch (default BATCH_SIZE)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.add_argument("--metrics-port", type=int, default=None, help="serve this worker's /metrics here")
    worker.add_argument("--metrics-host", default="127.0.0.1",
                        help="address for --metrics-port (default loopback; 0.0.0.0 inside a container network)")
    worker.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP CPU threads of this worker (default WORKER_THREADS or 1: several "
                             "workers on one host must not each take every core)")
    worker.set_defaults(func=cmd_worker)

    prelabel = commands.add_parser("prelabel", help="pre-label a whole LS project (queue mode with REDIS_URL)")
    prelabel.add_argument("--project", type=int, required=True, help="Label Studio project id")
    prelabel.add_argument("--prompt", default=None,
                          help="phrases; default: the project's remembered prompt, else its labels")
    prelabel.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                          help=f"tasks per job, {MIN_CHUNK} to {MAX_CHUNK} (default {DEFAULT_CHUNK}: several engine "
                               "batches, so loading overlaps the GPU)")
    prelabel.add_argument("--redo", action="store_true", help="also tasks that have a prediction of this version")
    prelabel.add_argument("--model-version", default=None,
                          help="queue mode: the version to label with when the live workers serve several "
                               "(default: the one they serve); embedded: must be this process's")
    prelabel.set_defaults(func=cmd_prelabel)

    warm = commands.add_parser("warm", help="encode a project's next tasks' SAM embeddings in the running backend")
    warm.add_argument("--project", type=int, required=True, help="Label Studio project id")
    warm.add_argument("--tasks", type=int, default=None, help="how many tasks (1-100; default PREWARM_TASKS or 3)")
    warm.add_argument("--after", type=int, default=None, help="start after this task id (default: the first task)")
    warm.add_argument("--url", default=None, help="the backend (default http://localhost:$PORT)")
    warm.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the backend")
    warm.set_defaults(func=cmd_warm)

    serve = commands.add_parser("serve", help="serve the LS ML-backend API (development server)")
    serve.add_argument("--port", type=int, default=None, help="default PORT or 9090")
    serve.add_argument("--host", default="0.0.0.0")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    from backend.logsetup import configure_logging

    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    from backend.errors import ModelLoadError
    from backend.settings import SettingsError

    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except (SettingsError, ModelLoadError) as exc:  # a bad setting: say which and the fix, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
