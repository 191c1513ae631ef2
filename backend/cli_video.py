"""``python -m backend predict VIDEO --prompt ...``: a video file → LS JSON (``--json``) and an
overlay (``--overlay``: an annotated MP4, or a strip of frames for ``.png``/``.jpg``).

An entry point like :mod:`backend.cli` (may import anything). The tracks come from the same
:class:`~backend.pipeline.video.VideoPipeline` the server runs, on a label config whose labels are
the prompt's phrases; the overlay draws each track's tracked box (not the thinned keyframes) on
every frame.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

# Distinct, readable colors for overlays (RGB), images and videos.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv"}
STRIP_FRAMES = 6
STRIP_HEIGHT = 180


def is_video_path(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def video_config_for_phrases(phrases: list[str], fps: float) -> str:
    """A video label config whose labels are the prompt phrases (the output is importable LS JSON)."""
    from xml.sax.saxutils import quoteattr

    labels = "".join(f"<Label value={quoteattr(p)}/>" for p in phrases)
    return (f'<View><Video name="video" value="$video" frameRate="{fps:g}"/>'
            f'<VideoRectangle name="box" toName="video"/>'
            f'<Labels name="videoLabels" toName="video">{labels}</Labels></View>')


def _boxes_by_frame(tracks) -> dict[int, list[tuple[str, tuple[float, float, float, float]]]]:
    frames: dict[int, list] = {}
    for track in tracks.tracks:
        for tracked in track.boxes:
            if tracked.box is not None:
                frames.setdefault(tracked.frame, []).append((track.label, tracked.box))
    return frames


def _draw(image: np.ndarray, boxes, colors) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, canvas.width // 300)
    for label, box in boxes:
        draw.rectangle(box, outline=colors[label], width=width)
        draw.text((box[0] + 3, box[1] + 2), label, fill=colors[label])
    return np.asarray(canvas)


def write_overlay(source, tracks, out: str) -> None:
    """Draw every track on the video: an H.264 MP4, or for an image path a strip of frames."""
    from PIL import Image

    labels = sorted({t.label for t in tracks.tracks})
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    by_frame = _boxes_by_frame(tracks)
    if Path(out).suffix.lower() in {".png", ".jpg", ".jpeg"}:
        picks = set(np.linspace(1, max(1, source.frames_count), STRIP_FRAMES).round().astype(int).tolist())
        tiles = []
        for frame in source.frames():
            if frame.frame in picks:
                tile = Image.fromarray(_draw(frame.image, by_frame.get(frame.frame, []), colors))
                tiles.append(tile.resize((max(1, tile.width * STRIP_HEIGHT // tile.height), STRIP_HEIGHT)))
        strip = Image.new("RGB", (sum(t.width for t in tiles), STRIP_HEIGHT))
        x = 0
        for tile in tiles:
            strip.paste(tile, (x, 0))
            x += tile.width
        strip.save(out)
        return
    import av

    with av.open(out, "w") as container:
        stream = container.add_stream("libx264", rate=round(tracks.fps))
        stream.width, stream.height = source.info.width - source.info.width % 2, source.info.height - source.info.height % 2
        stream.pix_fmt = "yuv420p"
        for frame in source.frames():
            image = _draw(frame.image, by_frame.get(frame.frame, []), colors)[:stream.height, :stream.width]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_outputs(args, prediction: dict, save_overlay: Callable[[str], None]) -> None:
    """``predict``'s outputs, image or video: the prediction JSON (``--json``) and the overlay
    (``--overlay``, written by ``save_overlay(path)``)."""
    if args.json:
        Path(args.json).write_text(json.dumps(prediction))
        print(f"wrote {args.json}")
    if args.overlay:
        save_overlay(args.overlay)
        print(f"wrote {args.overlay}")


def predict_video(args, settings, phrases: list[str]) -> int:
    from backend.errors import ImageError
    from backend.images.video import VideoSource
    from backend.ls.labelconfig import parse_label_config
    from backend.ls.tasks import PredictRequest
    from backend.ls.videoregions import build_video_prediction
    from backend.pipeline.predict import Pipeline

    try:
        source = VideoSource(Path(args.image).read_bytes(), max_frames=settings.max_video_frames, fps=args.fps)
    except (OSError, ImageError) as exc:
        print(f"error: cannot read {args.image}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2
    config = parse_label_config(video_config_for_phrases(phrases, args.fps))
    pipeline = Pipeline(settings)
    request = PredictRequest(tasks=[{"id": None, "data": {}}], config=config, context=None, bulk=True)
    with source:
        try:
            tracks, _ = pipeline.video.track_source(source, request, tuple(phrases), fps=args.fps)
        except ImageError as exc:
            print(f"error: {args.image}: {exc.reason}", file=sys.stderr)
            return 2
        prediction = build_video_prediction(tracks, config, pipeline.model_version, settings.video_keyframe_tolerance)
        info = source.info
        print(f"{args.image}: {info.width}x{info.height}, {source.frames_count} frames at {args.fps:g} fps, "
              f"{len(prediction['result'])} tracks ({pipeline.model_version})")
        write_outputs(args, prediction, lambda path: write_overlay(source, tracks, path))
    return 0
