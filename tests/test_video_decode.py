"""backend/images/video.py on real clips (tests/videoclips.py: libx264 from the PyAV wheel).

Each picture carries its encode index in its pixels, so every check compares what the decoder
returned for an LS frame with the picture LS 1.23 shows for it: the last picture whose pts time is
``<= (f - 1) / fps + 0.002`` (backend/ls/videotime.py).
"""

from __future__ import annotations

import math
import os
import weakref
from fractions import Fraction

import numpy as np
import pytest

from backend.images.video import VideoError, VideoFrame, VideoSource
from backend.ls.videotime import BROWSER_TIME_PRECISION, frame_start
from tests import videoclips as vc


def expected_indices(pts: list[float], fps: float, count: int) -> list[int]:
    """Per LS frame 1..count: the index of the last picture whose time is <= the frame's time."""
    out = []
    for f in range(1, count + 1):
        limit = frame_start(f, fps) + BROWSER_TIME_PRECISION
        out.append(max(i for i, t in enumerate(pts) if t <= limit + 1e-9))
    return out


def seen(frames) -> list[tuple[int, int, float]]:
    """(LS frame, burned index, picture time) per yielded frame."""
    return [(f.frame, vc.read_index(f.image), round(f.time, 6)) for f in frames]


@pytest.fixture(scope="module")
def gop_clips() -> dict[bool, bytes]:
    """120 frames at 25 fps, a keyframe every 10 (so seeks skip GOPs), with and without B-frames."""
    return {b: vc.clip_bytes(frames=120, fps=25, size=(192, 96), keyint=10, bframes=b) for b in (False, True)}


@pytest.mark.parametrize("fps", [25, 30])
def test_cfr_ls_frame_f_is_encoded_picture_f_minus_1(fps):
    data = vc.clip_bytes(frames=60, fps=fps, size=(192, 96))
    source = VideoSource(data, fps=fps)
    assert (source.info.width, source.info.height) == (192, 96)
    assert source.info.stream_fps == pytest.approx(fps)
    assert source.frames_count == round(source.info.duration * fps) == 60
    frames = list(source.frames())
    assert [f.frame for f in frames] == list(range(1, 61))
    assert [vc.read_index(f.image) for f in frames] == list(range(60))
    assert [f.time for f in frames] == pytest.approx([i / fps for i in range(60)], abs=1e-4)
    assert all(f.image.shape == (96, 192, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(isinstance(f, VideoFrame) and not f.image.flags.writeable for f in frames)


def test_bframe_clip_is_reordered_and_maps_the_same(gop_clips, tmp_path):
    data = gop_clips[True]
    reordered, bpictures = vc.bframe_evidence(data)
    assert reordered > 0 and bpictures > 0, "the clip has no B-frames: the test would prove nothing"
    assert vc.bframe_evidence(gop_clips[False]) == (0, 0)
    path = tmp_path / "bframes.mp4"
    path.write_bytes(data)
    for source in (VideoSource(data, fps=25), VideoSource(str(path), fps=25), VideoSource(path, fps=25)):
        assert source.frames_count == 120
        assert [vc.read_index(f.image) for f in source.frames()] == list(range(120))


VFR_PTS = ([i * 0.04 for i in range(6)]                    # 25 fps
           + [0.32, 0.33, 0.34, 0.35, 0.36, 0.37]          # denser than the LS clock
           + [0.50, 0.90, 0.94, 0.98, 1.30]                # gaps: frames repeat a picture
           + [1.30 + 0.04 * i for i in range(1, 8)])


@pytest.mark.parametrize("bframes", [False, True])
def test_vfr_ls_frame_is_last_picture_at_or_before_its_time(bframes):
    data = vc.clip_bytes(vfr_pts=VFR_PTS, bframes=bframes, keyint=6, size=(192, 96))
    reference = vc.decode_all(data)
    assert [t for t, _ in reference] == pytest.approx(VFR_PTS, abs=1e-6)  # the file really is VFR
    assert [i for _, i in reference] == list(range(len(VFR_PTS)))
    source = VideoSource(data, fps=25)
    assert source.frames_count == round(source.info.duration * 25)
    assert source.frames_count >= math.floor(VFR_PTS[-1] * 25) + 1
    want = expected_indices(VFR_PTS, 25, source.frames_count)
    full = seen(source.frames())
    assert [i for _, i, _ in full] == want
    assert [t for _, _, t in full] == pytest.approx([VFR_PTS[i] for i in want], abs=1e-6)
    for k in (2, 8, 13, 20, 25, source.frames_count):
        assert seen(source.frames(k)) == full[k - 1:], f"seek to LS frame {k}"


@pytest.mark.parametrize("file_fps,config_fps", [(30, 25), (25, 30), (25, 50), (Fraction(30000, 1001), 30)])
def test_config_fps_other_than_the_files_maps_through_time(file_fps, config_fps):
    data = vc.clip_bytes(frames=60, fps=file_fps, size=(192, 96), keyint=12)
    source = VideoSource(data, fps=config_fps)
    duration = 60 / float(file_fps)
    assert source.info.duration == pytest.approx(duration, abs=1e-3)
    assert source.frames_count == round(duration * config_fps)
    pts = [i / float(file_fps) for i in range(60)]
    want = expected_indices(pts, config_fps, source.frames_count)
    full = seen(source.frames())
    assert [i for _, i, _ in full] == want
    for k in (2, 17, 31, source.frames_count):
        assert seen(source.frames(k)) == full[k - 1:]


@pytest.mark.parametrize("bframes", [False, True])
def test_seeking_gives_the_pictures_of_a_full_pass(gop_clips, bframes, monkeypatch):
    source = VideoSource(gop_clips[bframes], fps=25)
    full = seen(source.frames())
    assert [i for _, i, _ in full] == list(range(120))
    for k in (2, 9, 10, 11, 12, 21, 37, 60, 100, 119, 120):
        assert seen(source.frames(k)) == full[k - 1:], f"frames({k})"
        assert seen(source.frames(k, min(k + 3, 120))) == full[k - 1:min(k + 3, 120)]
    # It really seeks: frames(101) decodes from the keyframe at index 100, not from the start.
    decoded = []
    original = VideoSource._decode

    def counting(self, container, stream):
        for item in original(self, container, stream):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(VideoSource, "_decode", counting)
    assert seen(source.frames(101, 103)) == full[100:103]
    assert decoded[0] == pytest.approx(4.0) and len(decoded) < 10


def test_a_seek_that_lands_after_the_target_goes_back(gop_clips):
    class LateSeeks(VideoSource):  # a demuxer whose seek lands on a later keyframe
        def _seek_offset(self, when: float) -> int:
            return super()._seek_offset(when + 0.5 if when > 0 else when)

    data = gop_clips[True]
    full = seen(VideoSource(data, fps=25).frames())
    late = LateSeeks(data, fps=25)
    for k in (3, 14, 60, 118):
        assert seen(late.frames(k, k + 2)) == full[k - 1:k + 2]


@pytest.mark.parametrize("start,stop,block", [(1, 120, 32), (3, 50, 7), (40, 41, 1), (5, 5, 32), (1, 120, 200),
                                              (99, 120, 10)])
def test_frames_reversed_is_the_reversed_forward_pass(gop_clips, start, stop, block):
    source = VideoSource(gop_clips[True], fps=25)
    assert seen(source.frames_reversed(start, stop, block=block)) == seen(source.frames(start, stop))[::-1]


def test_frames_after_the_last_picture_repeat_it_and_share_one_array():
    data = vc.clip_bytes(vfr_pts=[0.0, 0.04, 0.08, 0.5], size=(192, 96))  # the last picture is shown long
    source = VideoSource(data, fps=25)
    frames = list(source.frames())
    assert source.frames_count == len(frames) > 4
    assert [vc.read_index(f.image) for f in frames][:4] == [0, 1, 2, 2]
    repeated = [f for f in frames if vc.read_index(f.image) == 2]
    assert len(repeated) > 1 and all(f.image is repeated[0].image for f in repeated)


def test_video_without_duration_or_index_is_scanned_for_its_length():
    data = vc.clip_bytes(frames=40, fps=25, size=(192, 96), keyint=10, bframes=True,
                         container_format="matroska", muxer_options={"live": "1"})
    source = VideoSource(data, fps=25)
    assert source.info.duration == pytest.approx(1.6, abs=1e-3) and source.frames_count == 40
    full = seen(source.frames())
    assert [i for _, i, _ in full] == list(range(40))
    assert seen(source.frames(23)) == full[22:]


def test_webm_vp9_is_read():
    data = vc.clip_bytes(frames=30, fps=25, size=(192, 96), codec="libvpx-vp9", container_format="webm")
    source = VideoSource(data, fps=25)
    assert [vc.read_index(f.image) for f in source.frames()] == list(range(30))


def test_rotation_is_reported_not_applied():
    source = VideoSource(vc.clip_bytes(frames=5, size=(192, 96), rotation=90), fps=25)
    assert source.info.rotation == 90
    assert next(source.frames()).image.shape == (96, 192, 3)


def test_the_square_is_where_square_box_says():
    square = (20, (10, 30), (3, 1))
    source = VideoSource(vc.clip_bytes(frames=20, size=(192, 96), square=square), fps=25)
    for f in source.frames():
        red = (f.image[..., 0] > 180) & (f.image[..., 1] < 110) & (f.image[..., 2] < 110)
        ys, xs = np.nonzero(red)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.abs(np.subtract(box, vc.square_box(f.frame - 1, square))).max() <= 1


def test_more_frames_than_max_is_refused_with_the_numbers():
    data = vc.clip_bytes(frames=50, fps=25, size=(192, 96))
    assert VideoSource(data, fps=25, max_frames=50).frames_count == 50
    with pytest.raises(VideoError) as caught:
        VideoSource(data, fps=25, max_frames=49)
    assert "50 frames at 25 fps (2.00 s); MAX_VIDEO_FRAMES is 49" in caught.value.reason
    assert "\n" not in caught.value.reason


def drain(data: bytes) -> None:
    source = VideoSource(data, fps=25)
    for _ in source.frames():
        pass
    for _ in source.frames(source.frames_count // 2):
        pass


@pytest.fixture(scope="module")
def clip_pair() -> dict[str, bytes]:
    """The same 100-frame clip with its index (moov) at the end (PyAV's default) and at the start."""
    kwargs = dict(frames=100, fps=25, size=(192, 96), keyint=10, bframes=True)
    return {"end": vc.clip_bytes(**kwargs), "start": vc.clip_bytes(faststart=True, **kwargs)}


@pytest.mark.parametrize("layout,damage", [
    ("end", lambda d: vc.truncated(d, 0.5)),       # no moov: no video stream
    ("start", lambda d: vc.truncated(d, 0.5)),     # opens, the pictures stop half way
    ("start", lambda d: vc.truncated(d, 0.02)),    # not even one picture
    ("start", lambda d: vc.garbled(d, start=0.0, length=64)),
    ("start", lambda d: vc.garbled(d, start=0.01, length=2000)),
    ("start", lambda d: vc.garbled(d, start=0.5, length=2000)),   # mid-stream decoding error
    ("end", lambda d: vc.garbled(d, start=0.4, length=2000)),
])
def test_damaged_clips_raise_video_error(clip_pair, layout, damage):
    with pytest.raises(VideoError) as caught:
        drain(damage(clip_pair[layout]))
    assert "\n" not in caught.value.reason and len(caught.value.reason) < 300


def test_random_damage_raises_nothing_but_video_error(clip_pair):
    for seed in range(12):
        data = vc.garbled(clip_pair["start" if seed % 2 else "end"], start=0.05 + 0.075 * seed, length=300 + 97 * seed,
                          seed=seed)
        try:
            drain(data)
        except VideoError:
            pass


@pytest.mark.parametrize("data", [*vc.NOT_MEDIA, vc.png_bytes(), vc.audio_only_mp4()],
                         ids=["text", "html", "zeros", "empty", "png", "audio-only"])
def test_what_is_not_a_video_is_refused(data):
    with pytest.raises(VideoError) as caught:
        VideoSource(data)
    assert "\n" not in caught.value.reason


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(VideoError, match="No such file"):
        VideoSource(str(tmp_path / "missing.mp4"))
    assert str(tmp_path) not in str(pytest.raises(VideoError, VideoSource, str(tmp_path / "x.mp4")).value)
    with pytest.raises(TypeError):
        VideoSource(12)
    data = vc.clip_bytes(frames=10, size=(192, 96))
    for fps in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            VideoSource(data, fps=fps)
    source = VideoSource(data, fps=25)
    for start, stop in ((0, 5), (1, 11)):
        with pytest.raises(ValueError):
            source.frames(start, stop)
    with pytest.raises(ValueError):
        source.frames_reversed(5, 4)
    assert list(source.frames(6, 5)) == []


def test_close_ends_open_iterators():
    source = VideoSource(vc.clip_bytes(frames=30, size=(192, 96)), fps=25)
    walk = source.frames()
    assert next(walk).frame == 1
    source.close()
    assert list(walk) == []
    with pytest.raises(ValueError):
        source.frames()


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_over_a_long_clip():
    """300 pictures of 480x360 (0.5 MB each as RGB): a pass must not keep them."""
    data = vc.clip_bytes(frames=300, fps=25, size=(480, 360), keyint=50, bframes=True)
    source = VideoSource(data, fps=25)
    picture = 480 * 360 * 3
    for _ in source.frames(1, 20):  # warm the decoder's pools
        pass
    base = peak = _rss()
    images: list[weakref.ref] = []
    count = 0
    for frame in source.frames():
        images.append(weakref.ref(frame.image))
        count += 1
        if count % 10 == 0:
            peak = max(peak, _rss())
        assert sum(ref() is not None for ref in images[-8:]) <= 1  # only the current picture lives
    del frame
    assert count == 300
    assert peak - base < 40 * picture, f"memory grew by {(peak - base) / 1e6:.1f} MB over 300 frames"
