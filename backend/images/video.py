"""Video bytes → the pictures Label Studio shows for its frame numbers (PyAV; torch-free).

Frames and shapes:

* A :class:`VideoFrame`'s ``image`` is ``(height, width, 3)`` uint8 RGB in the *decoded* pixel
  frame: ``VideoInfo.width x VideoInfo.height``, the size of the first decoded picture (later
  pictures of another size are scaled to it). Boxes on these images are in that frame.
* Rotation metadata (a display matrix, e.g. phone videos) is **not** applied: the pixels stay as
  decoded, and ``VideoInfo.rotation`` reports the degrees (counter-clockwise) a browser would rotate
  them by. Non-square pixels are not resampled either; LS regions are percent of the frame, so a
  percent box maps to the displayed frame all the same.
* Times are seconds of presentation time from the first decoded picture's pts (the stream's start).

LS frame numbers (1-based) map to pictures through time, as LS 1.23 does
(:mod:`backend.ls.videotime`, ``shared/research/video-protocol.md`` §1.3): LS frame *f* at the
config's ``fps`` is the last decoded picture whose time is ``<= (f - 1) / fps +
BROWSER_TIME_PRECISION``; frames after the last picture repeat it (what a browser shows). Decoded
pictures are never counted after a seek: :meth:`VideoSource.frames` seeks to the keyframe at or
before the first wanted time and compares pts times while decoding forward.

Every failure is a :class:`VideoError` (an :class:`~backend.errors.ImageError`) whose ``reason`` is
one log-safe line (no path, no bytes) saying what is wrong and what to do. Only containers a browser
plays are opened (:data:`ALLOWED_FORMATS`: MP4/MOV, WebM/Matroska, Ogg), so hostile bytes reach few
FFmpeg demuxers; a PNG or GIF is refused even though FFmpeg could read it as a one-frame "video".

May import: :mod:`backend.errors` and :mod:`backend.ls.videotime`; numpy and av (PyAV, FFmpeg
inside the wheel).
"""

from __future__ import annotations

import io
import math
import os
import weakref
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np

from backend.errors import ImageError
from backend.ls.videotime import BROWSER_TIME_PRECISION, frame_start, frames_count

__all__ = ["ALLOWED_FORMATS", "VideoError", "VideoFrame", "VideoInfo", "VideoSource"]

#: FFmpeg demuxer names (the parts of ``container.format.name``) of the containers browsers play.
ALLOWED_FORMATS = frozenset({"mov", "mp4", "matroska", "webm", "ogg"})
#: When the keyframe a seek lands on starts after the wanted time, seek again this much earlier
#: (doubling each time) before falling back to the start of the file.
_SEEK_BACK_S = 1.0
#: Pictures that end this much (seconds) before the stream's header says: a truncated file.
_TRUNCATION_S = 1.0
#: FFmpeg errors while opening or decoding (``av.error.FFmpegError`` subclasses OSError, ValueError,
#: ... too); OSError covers the file itself (permissions, a directory).
_DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError)
_FIX = "re-encode it as H.264 MP4 (or WebM) and upload it again"


class VideoError(ImageError):
    """A video could not be opened or decoded, or is over a limit; ``reason`` says what is wrong
    and what to do, in one log-safe line. It fails its own task only."""


@dataclass(frozen=True)
class VideoInfo:
    """What the probe read from a video.

    width, height: decoded frame size in pixels (the frame boxes are in).
    duration:      seconds: the container's duration (what a browser's ``<video>.duration``
                   reports), else the stream's, else the last packet's pts + duration.
    stream_fps:    the stream's average frame rate, informative only (LS uses the config's).
    rotation:      display-matrix rotation in degrees counter-clockwise; informative, not applied.
    """

    width: int
    height: int
    duration: float
    stream_fps: float | None
    rotation: int = 0


@dataclass(frozen=True)
class VideoFrame:
    """One LS frame.

    frame: LS frame number, 1-based.
    time:  presentation time (seconds from the first picture's pts) of the decoded picture used.
    image: ``(height, width, 3)`` uint8 RGB, read-only; repeated frames share one array.
    """

    frame: int
    time: float
    image: np.ndarray


def _why(err: BaseException) -> str:
    """FFmpeg's one-line reason for ``err`` (never its file name)."""
    text = getattr(err, "strerror", None) or type(err).__name__
    return " ".join(str(text).split())[:200]


class VideoSource:
    """One video's bytes, opened on demand. Thread-compatible, not thread-safe.

    ``data``: the file's bytes, or a file path. ``fps``: the label config's ``frameRate`` (LS's
    clock), not the file's. ``max_frames``: refuse a video of more LS frames; ``max_pixels``: of
    larger pictures (None: no limit).
    The constructor probes the video once (header, first picture, duration) and raises
    :class:`VideoError` for anything that is not a playable video. Each :meth:`frames` iterator
    opens its own demuxer and closes it when exhausted or closed; :meth:`close` closes them all.
    """

    def __init__(self, data: bytes | str | os.PathLike, max_frames: int | None = None, fps: float = 24.0,
                 *, max_pixels: int | None = None):
        if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive finite number, got {fps!r}")
        for name, limit in (("max_frames", max_frames), ("max_pixels", max_pixels)):
            if limit is not None and (not isinstance(limit, int) or limit < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {limit!r}")
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._data: bytes | None = bytes(data)
            self._path: str | None = None
        elif isinstance(data, (str, os.PathLike)):
            self._data, self._path = None, os.fspath(data)
        else:
            raise TypeError(f"data must be bytes or a file path, not {type(data).__name__}")
        self.fps = float(fps)
        self.max_frames, self.max_pixels = max_frames, max_pixels
        self._closed = False
        self._live: weakref.WeakSet = weakref.WeakSet()
        self.info = self._probe()
        self._count = frames_count(self.info.duration, self.fps)
        if max_frames is not None and self._count > max_frames:
            raise VideoError(
                f"the video has {self._count} frames at {self.fps:g} fps ({self.info.duration:.2f} s); "
                f"MAX_VIDEO_FRAMES is {max_frames}: raise MAX_VIDEO_FRAMES or cut the video into shorter tasks")

    @property
    def frames_count(self) -> int:
        """LS's frame count: ``round(duration * fps)`` (:func:`backend.ls.videotime.frames_count`)."""
        return self._count

    # -- opening and probing ------------------------------------------------------------------

    def _open(self):
        """A fresh ``(container, video stream)``; VideoError for anything that is not a video."""
        if self._closed:
            raise ValueError("the VideoSource is closed")
        try:
            container = av.open(io.BytesIO(self._data) if self._data is not None else self._path, "r",
                                metadata_errors="ignore")
        except _DECODE_ERRORS as err:
            raise VideoError(f"the file is not a video that can be read ({_why(err)}): {_FIX}") from None
        try:
            names = set(container.format.name.split(","))
            if not names & ALLOWED_FORMATS:
                raise VideoError(f"the file is a {container.format.name!r} file, not a video container a "
                                 f"browser plays (MP4, WebM, Ogg): {_FIX}")
            if not container.streams.video:
                raise VideoError(f"the file has no video stream (audio only, or truncated): {_FIX}")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoError(f"the video's codec ({stream.codec.name if stream.codec else 'unknown'}) "
                                 f"cannot be decoded here: {_FIX}")
            stream.thread_type = "AUTO"
        except BaseException:
            container.close()
            raise
        return container, stream

    def _probe(self) -> VideoInfo:
        container, stream = self._open()
        try:
            self._time_base = stream.time_base
            self._rate = float(stream.average_rate) if stream.average_rate else None
            self._origin = 0.0
            self._check_pixels(stream.codec_context.width, stream.codec_context.height)
            first = self._first_picture(container, stream)
            self._check_pixels(first.width, first.height)
            self._timestamps = first.time is not None  # False: never seek, time pictures by rate
            if self._timestamps:
                self._origin = first.time
            width, height = first.width, first.height
            rotation = int(round(first.rotation or 0))
            end = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
            self._stream_end = end if end > 0 else None  # the video stream's own length, per its header
            duration = (container.duration / av.time_base if container.duration and container.duration > 0
                        else self._stream_end)
        finally:
            container.close()
        if duration is None:
            duration = self._scan_duration()
        if not duration > 0 or not math.isfinite(duration):
            raise VideoError(f"the video's duration cannot be determined: {_FIX}")
        return VideoInfo(width=width, height=height, duration=duration, stream_fps=self._rate, rotation=rotation)

    def _check_pixels(self, width: int, height: int) -> None:
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise VideoError(f"the video's pictures are {width}x{height} pixels; MAX_IMAGE_PIXELS is "
                             f"{self.max_pixels}: raise it or scale the video down")

    @staticmethod
    def _first_picture(container, stream) -> av.VideoFrame:
        try:
            for packet in container.demux(stream):
                for picture in packet.decode():
                    return picture
        except _DECODE_ERRORS as err:
            raise VideoError(f"the video's first picture could not be decoded ({_why(err)}): {_FIX}") from None
        raise VideoError(f"no picture could be decoded from the video: {_FIX}")

    def _scan_duration(self) -> float:
        """The last packet's pts + duration, from the origin (a demux pass, no decoding)."""
        container, stream = self._open()
        end = None
        try:
            for packet in container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if packet.size and stamp is not None:
                    stop = stamp + max(packet.duration or 0, 0)
                    end = stop if end is None else max(end, stop)
        except _DECODE_ERRORS as err:
            raise VideoError(f"the video could not be read to find its duration ({_why(err)}): {_FIX}") from None
        finally:
            container.close()
        if end is None or not stream.time_base:
            return 0.0
        return float(end * stream.time_base) - self._origin

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self, container, stream) -> Iterator[tuple[float, av.VideoFrame]]:
        """Decoded pictures in presentation order with their time (seconds from the origin).

        A picture without pts gets the previous time plus one frame (its duration, else the stream
        rate, else the config fps); times never go back (a broken stream's pts are clamped)."""
        previous = None
        try:
            for packet in container.demux(stream):
                for picture in packet.decode():
                    time = picture.time
                    if time is None or not self._timestamps:
                        time = 0.0 if previous is None else previous + self._step(picture)
                    else:
                        time -= self._origin
                    if previous is not None and time < previous:
                        time = previous
                    previous = time
                    yield time, picture
        except _DECODE_ERRORS as err:
            at = f" after {previous:.2f} s" if previous is not None else ""
            raise VideoError(f"the video could not be decoded{at} ({_why(err)}): {_FIX}") from None

    def _step(self, picture) -> float:
        if picture.duration and picture.duration > 0 and picture.time_base:
            return float(picture.duration * picture.time_base)
        return 1.0 / (self._rate or self.fps)

    def _pictures(self, container, stream, target: float, seek: bool) -> Iterator[tuple[float, av.VideoFrame]]:
        """Pictures from one whose time is ``<= target`` on; from the first picture without
        ``seek`` or when the stream has no timestamps to seek by."""
        if not seek or not self._timestamps:
            yield from self._decode(container, stream)
            return
        back = 0.0
        while True:
            when = max(target - back, 0.0)
            try:
                container.seek(self._seek_offset(when), stream=stream, backward=True)
            except _DECODE_ERRORS as err:
                raise VideoError(f"the video could not be seeked to {when:.2f} s ({_why(err)}): {_FIX}") from None
            pictures = self._decode(container, stream)
            first = next(pictures, None)
            if first is None and when <= 0:
                return
            if first is not None and (first[0] <= target or when <= 0):
                yield first
                yield from pictures
                return
            pictures.close()
            back = max(_SEEK_BACK_S, 2 * back)  # the keyframe found starts after the target

    def _seek_offset(self, when: float) -> int:
        """The seek target for ``when`` seconds from the origin, in the stream's time base."""
        return int(math.floor((when + self._origin) / self._time_base))

    def frames(self, start: int = 1, stop: int | None = None) -> Iterator[VideoFrame]:
        """LS frames ``start..stop`` (inclusive, 1-based; ``stop`` None = :attr:`frames_count`), in
        order, streaming: each decoded picture is dropped once passed, so memory does not grow
        with the length.

        LS frame *f* is the picture shown at ``t = frame_start(f, fps)``: the last decoded picture
        whose time is ``<= t + BROWSER_TIME_PRECISION``. For ``start > 1`` it seeks to the keyframe
        at or before that time and decodes forward comparing pts times (never counting pictures).
        Frames after the last picture repeat it. Empty when ``start > stop``; ValueError for a
        range outside ``1..frames_count``; VideoError for a decoding error mid-stream or pictures
        that end over a second before the stream's header says (a truncated file).
        """
        stop = self._count if stop is None else stop
        if not isinstance(start, int) or not isinstance(stop, int):
            raise ValueError(f"start and stop must be ints, got {start!r}, {stop!r}")
        if start < 1 or stop > self._count:
            raise ValueError(f"frames {start}..{stop} are outside 1..{self._count} (LS frames of this video)")
        if self._closed:
            raise ValueError("the VideoSource is closed")
        walk = self._walk(start, stop)
        self._live.add(walk)
        return walk

    def _walk(self, start: int, stop: int) -> Iterator[VideoFrame]:
        def limit(f: int) -> float:
            return frame_start(f, self.fps) + BROWSER_TIME_PRECISION

        if stop < start:
            return
        container, stream = self._open()
        pictures = self._pictures(container, stream, limit(start), seek=start > 1)
        try:
            size = (self.info.width, self.info.height)
            shown: _Shown | None = None
            f = start
            for time, picture in pictures:
                while f <= stop and time > limit(f):
                    if shown is None:
                        raise VideoError(f"no picture of the video starts at or before frame {f}: {_FIX}")
                    yield shown.frame(f, size)
                    f += 1
                if f > stop:
                    return
                shown = _Shown(time, picture, time + self._step(picture))
            if shown is None:
                raise VideoError(f"no picture could be decoded for frames {start}..{stop}: {_FIX}")
            if self._stream_end is not None and shown.end + _TRUNCATION_S < self._stream_end:
                raise VideoError(f"the video's pictures end at {shown.end:.2f} s but its header says "
                                 f"{self._stream_end:.2f} s: the file is truncated or damaged; upload it again")
            while f <= stop:
                yield shown.frame(f, size)
                f += 1
        finally:
            pictures.close()
            container.close()

    def frames_reversed(self, start: int, stop: int, block: int = 32) -> Iterator[VideoFrame]:
        """LS frames ``stop, stop - 1, ..., start`` (``start <= stop``): blocks of ``block`` LS
        frames decoded forward (each from its own seek) and yielded reversed, so memory is bounded
        by one block. Each block costs a seek and the decode from its keyframe."""
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        if not isinstance(start, int) or not isinstance(stop, int) or not 1 <= start <= stop <= self._count:
            raise ValueError(f"frames_reversed needs 1 <= start <= stop <= {self._count}, got {start!r}, {stop!r}")
        walk = self._reversed(start, stop, block)
        self._live.add(walk)
        return walk

    def _reversed(self, start: int, stop: int, block: int) -> Iterator[VideoFrame]:
        high = stop
        while high >= start:
            low = max(start, high - block + 1)
            chunk = list(self.frames(low, high))
            while chunk:
                yield chunk.pop()
            high = low - 1

    def close(self) -> None:
        """Close every open iterator (and its demuxer) and drop the bytes; later calls raise."""
        self._closed = True
        for walk in list(self._live):
            walk.close()
        self._data = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Shown:
    """The picture on screen: converted to RGB once, on first use."""

    __slots__ = ("time", "picture", "end", "image")

    def __init__(self, time: float, picture: av.VideoFrame, end: float):
        self.time, self.picture, self.end, self.image = time, picture, end, None

    def frame(self, number: int, size: tuple[int, int]) -> VideoFrame:
        if self.image is None:
            scale = {} if (self.picture.width, self.picture.height) == size else dict(width=size[0], height=size[1])
            try:
                image = self.picture.to_ndarray(format="rgb24", **scale)
            except _DECODE_ERRORS as err:
                raise VideoError(f"a picture of the video could not be converted to RGB ({_why(err)}): {_FIX}") \
                    from None
            image.flags.writeable = False
            self.image, self.picture = image, None
        return VideoFrame(frame=number, time=self.time, image=self.image)
