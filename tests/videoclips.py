"""Test clips made with PyAV's bundled encoders (libx264 in the wheel; no system ffmpeg).

Every frame burns its own 0-based *encode index* into its top rows as a row of :data:`BITS` big
black/white blocks (the index in binary, most significant bit on the left), which survives H.264
compression at any sane quality and reads back exactly with :func:`read_index`. Below the code row
an optional coloured square (the "object") moves by a fixed velocity per encoded frame, so its box
is known for every index (:func:`square_box`).

Frames (what the clips are): ``size`` is ``(width, height)`` in pixels; boxes are XYXY pixels of
that frame, end-exclusive. Times are seconds of presentation time from the first frame.

The other makers build what a decoder must refuse: truncated or garbled copies of a valid clip, an
audio-only MP4, a PNG, and bytes that are no media at all.
"""

from __future__ import annotations

import io
import random
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from av.video.frame import PictureType

BITS = 12  # up to 4096 distinct indices
BACKGROUND = 128
SQUARE_RGB = (230, 40, 40)
#: Timestamps of variable-rate clips are written in this time base (the MP4 muxer keeps it).
VFR_TIME_BASE = Fraction(1, 90000)

Square = tuple[int, tuple[int, int], tuple[int, int]]  # (side, (x0, y0) at index 0, (vx, vy) per index)


def block_size(width: int) -> int:
    """Side in pixels of one code block for a frame ``width`` pixels wide."""
    return width // BITS


def square_box(index: int, square: Square) -> tuple[int, int, int, int]:
    """The object's XYXY box (end-exclusive pixels) on the frame encoded at 0-based ``index``."""
    side, (x0, y0), (vx, vy) = square
    x, y = x0 + vx * index, y0 + vy * index
    return x, y, x + side, y + side


def draw_frame(index: int, size: tuple[int, int], square: Square | None = None) -> np.ndarray:
    """The ``(height, width, 3)`` uint8 RGB picture encoded at ``index``."""
    width, height = size
    block = block_size(width)
    image = np.full((height, width, 3), BACKGROUND, np.uint8)
    for bit in range(BITS):
        on = (index >> (BITS - 1 - bit)) & 1
        image[:block, bit * block:(bit + 1) * block] = 255 if on else 0
    if square is not None:
        x0, y0, x1, y1 = square_box(index, square)
        image[y0:y1, x0:x1] = SQUARE_RGB
    return image


def read_index(image: np.ndarray) -> int:
    """The index burned into an RGB frame by :func:`draw_frame` (the centre of each block decides)."""
    height, width = image.shape[:2]
    block = block_size(width)
    quarter = max(1, block // 4)
    value = 0
    for bit in range(BITS):
        x = bit * block
        centre = image[quarter:block - quarter, x + quarter:x + block - quarter]
        value = (value << 1) | int(centre.mean() > 127)
    return value


def make_clip(path: str | Path | io.BytesIO, *, frames: int = 50, fps: int | Fraction = 25,
              size: tuple[int, int] = (320, 240), bframes: bool = False, keyint: int | None = None,
              vfr_pts: Sequence[float] | None = None, codec: str = "libx264", square: Square | None = None,
              faststart: bool = False, rotation: int | None = None, container_format: str = "mp4",
              muxer_options: dict[str, str] | None = None) -> Path | io.BytesIO:
    """Encode a clip of ``frames`` pictures (:func:`draw_frame` of 0..frames-1) and return ``path``.

    ``fps``: the constant rate (``pts = i / fps``) unless ``vfr_pts`` gives each frame's time in
    seconds (strictly increasing; ``frames`` is then ``len(vfr_pts)``). ``bframes``: two B-frames
    between references, forced (``b-adapt=0``) so the stream really has them. ``keyint``: frames per
    GOP (closed, no scene cuts), default ``2 * fps``. ``faststart``: the index (``moov``) before the
    data, so a truncated copy still opens. ``rotation``: a display-matrix rotation in degrees.
    ``container_format``/``muxer_options``: the muxer and its options (``matroska`` with
    ``{"live": "1"}`` writes no duration and no index).
    """
    if vfr_pts is not None:
        frames = len(vfr_pts)
        if any(b <= a for a, b in zip(vfr_pts, vfr_pts[1:])):
            raise ValueError("vfr_pts must increase strictly")
    width, height = size
    if width % 2 or height % 2 or block_size(width) < 8:
        raise ValueError(f"size {size}: even sides and a width of at least {8 * BITS} px")
    if square is not None:
        for index in (0, frames - 1):
            x0, y0, x1, y1 = square_box(index, square)
            if x0 < 0 or y0 < block_size(width) or x1 > width or y1 > height:
                raise ValueError(f"the square leaves the frame (or covers the code row) at index {index}")
    rate = Fraction(fps)
    options = dict(muxer_options or {}, **({"movflags": "faststart"} if faststart else {}))
    target = str(path) if isinstance(path, Path) else path
    with av.open(target, "w", format=container_format, options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if vfr_pts is not None:
            stream.time_base = VFR_TIME_BASE
            stream.codec_context.time_base = VFR_TIME_BASE
        if codec == "libx264":
            gop = keyint or max(1, int(2 * rate))
            stream.options = {"preset": "veryfast", "crf": "16", "x264-params":
                              f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0:"
                              f"bframes={2 if bframes else 0}:b-adapt=0"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index in range(frames):
            picture = av.VideoFrame.from_ndarray(draw_frame(index, size, square), format="rgb24")
            if vfr_pts is not None:
                picture.pts = round(Fraction(vfr_pts[index]) / VFR_TIME_BASE)
                picture.time_base = VFR_TIME_BASE
            else:
                picture.pts = index
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return Path(path) if isinstance(path, (str, Path)) else path


def clip_bytes(**kwargs) -> bytes:
    """:func:`make_clip`'s bytes (through a temporary file: ``faststart`` rewrites the file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"clip.{kwargs.get('container_format', 'mp4')}"
        make_clip(path, **kwargs)
        return path.read_bytes()


def decode_all(data: bytes | str | Path) -> list[tuple[float, int]]:
    """Reference decode (one sequential pass, no seeking): ``(pts time, burned index)`` per picture."""
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source) as container:
        return [(frame.time, read_index(frame.to_ndarray(format="rgb24")))
                for frame in container.decode(container.streams.video[0])]


def bframe_evidence(data: bytes | str | Path) -> tuple[int, int]:
    """``(packets whose dts != pts, pictures of type B)``: both are > 0 only for a B-frame stream."""
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source) as container:
        stream = container.streams.video[0]
        reordered = bframes = 0
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None and packet.dts is not None and packet.pts != packet.dts:
                reordered += 1
            for frame in packet.decode():
                bframes += frame.pict_type == PictureType.B
    return reordered, bframes


def keyframe_times(data: bytes) -> list[float]:
    """Presentation times (from the first packet's pts) of the keyframe packets, in file order."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        pts = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and p.pts is not None]
    first = min(p for p, _ in pts)
    return [float((p - first) * stream.time_base) for p, key in pts if key]


def truncated(data: bytes, fraction: float) -> bytes:
    """The first ``fraction`` of ``data`` (an interrupted download)."""
    return data[:int(len(data) * fraction)]


def garbled(data: bytes, *, start: float = 0.3, length: int = 4096, seed: int = 0) -> bytes:
    """``data`` with ``length`` random bytes written over it at ``start`` (a fraction of its size)."""
    rng = random.Random(seed)
    at = int(len(data) * start)
    noise = bytes(rng.randrange(256) for _ in range(min(length, len(data) - at)))
    return data[:at] + noise + data[at + len(noise):]


def audio_only_mp4(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """An MP4 with one AAC audio stream (silence) and no video."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        chunk = 1024
        for index in range(int(seconds * rate) // chunk):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, chunk), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, index * chunk
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A small PNG (FFmpeg opens it as a one-frame ``png_pipe`` "video")."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "rgb24"
        frame = av.VideoFrame.from_ndarray(draw_frame(0, (max(size[0], 8 * BITS), size[1]))[:, :size[0]],
                                           format="rgb24")
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    return buffer.getvalue()


NOT_MEDIA = (b"hello, this is not a video\n" * 20, b"<!doctype html><html><body>404 Not Found</body></html>",
             b"\x00" * 4096, b"")
