"""A video track in LS's own editor: Debian's Chromium (the session's one, tests/conftest.py) driven
by Playwright against the suite's real Label Studio 1.23.

A clip whose every frame burns its 0-based index (tests/videoclips.py) and shows a red square moving
4 px right and 1 px down per frame gets a stored prediction: one ``videorectangle`` track with two
keyframes on the square, LS frame 1 (index 0) and LS frame 41 (index 40, ``enabled: false``). The
test opens the task, types LS frame numbers into the timeline's frame box (what an annotator does),
and reads each screenshot back:

* the picture: LS 1.23 frame *f* must show the decoded picture with index *f - 1* (LS seeks to
  ``(f - 1) / frameRate + 0.002`` s; research/video-protocol.md §1.3), read from the code blocks;
* the box: LS interpolates the keyframes linearly; the rectangle it draws (the label's colour, pure
  green here) must be where the interpolation puts it, within 2 px (LS draws a 320x240 video 1:1,
  centred, on a half-pixel when the canvas' spare width is odd, and its 1 px stroke straddles the
  edge), and so on the red square of that picture;
* after the disabled keyframe no box is drawn.

The labeling view at one of the frames is saved as test-artifacts/browser/video-flow.png, and as
docs/video-flow.png (the README's picture) with UPDATE_DOCS_SCREENSHOT=1. Markers ``e2e`` and
``browser``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.test_e2e_browser import ARTIFACTS, REPO, UI_TIMEOUT_MS, kept_on_failure, log_in, save_flow_screenshot
from tests.videoclips import make_clip, read_index, square_box

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

FLOW_SHOT = ARTIFACTS / "video-flow.png"
README_SHOT = REPO / "docs" / "video-flow.png"
WIDTH, HEIGHT, FPS, FRAMES = 320, 240, 25, 50
SQUARE = (48, (20, 60), (4, 1))  # side, top-left at index 0, pixels per frame
GREEN = "#00ff00"  # the label's colour: nothing in the clip is green
CONFIG = f"""<View>
  <Video name="video" value="$video" frameRate="{FPS}"/>
  <TextArea name="prompt" toName="video" rows="1" maxSubmissions="1" showSubmitButton="true"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="videoLabels" toName="video">
    <Label value="square" background="{GREEN}"/><Label value="disc" background="#0000ff"/>
  </Labels>
</View>"""
TOLERANCE_PX = 2.0


def percent(index: int) -> dict:
    """The square's box on the picture with this index, in LS percent."""
    x0, y0, x1, y1 = square_box(index, SQUARE)
    return {"x": 100 * x0 / WIDTH, "y": 100 * y0 / HEIGHT, "width": 100 * (x1 - x0) / WIDTH,
            "height": 100 * (y1 - y0) / HEIGHT}


KEYFRAMES = [{"frame": 1, "enabled": True, "rotation": 0, "time": 1 / FPS, **percent(0)},
             {"frame": 41, "enabled": False, "rotation": 0, "time": 41 / FPS, **percent(40)}]
TRACK = {"id": "knownTrack1", "type": "videorectangle", "from_name": "box", "to_name": "video", "score": 0.9,
         "value": {"labels": ["square"], "framesCount": FRAMES, "duration": FRAMES / FPS, "sequence": KEYFRAMES}}


def track_box(frame: int) -> tuple[float, float, float, float] | None:
    """Where LS shows TRACK on LS frame ``frame`` (XYXY pixels of the video), or None: the nearest
    keyframe at or before it decides (none, or a disabled one not at this frame: hidden), then a
    linear interpolation to the next keyframe (research/video-protocol.md §1.4)."""
    before = [k for k in KEYFRAMES if k["frame"] <= frame]
    if not before or (not before[-1]["enabled"] and before[-1]["frame"] != frame):
        return None
    a = before[-1]
    after = [k for k in KEYFRAMES if k["frame"] > frame]
    b = after[0] if after else a
    t = (frame - a["frame"]) / (b["frame"] - a["frame"]) if after else 0.0
    x, y, w, h = (a[k] + (b[k] - a[k]) * t for k in ("x", "y", "width", "height"))
    return x * WIDTH / 100, y * HEIGHT / 100, (x + w) * WIDTH / 100, (y + h) * HEIGHT / 100



def go_to_frame(page, frame: int) -> None:
    """Type ``frame`` into the timeline's frame box (click "N of M", type, Enter) and wait until the
    video has seeked there and the canvas has been drawn."""
    page.locator(".lsf-frames-control").click()
    box = page.locator(".lsf-frames-control input")
    box.fill(str(frame))
    box.press("Enter")
    page.wait_for_function("""frame => {
        const v = document.querySelector('video'), box = document.querySelector('.lsf-frames-control');
        return v && !v.seeking && v.readyState >= 2 && box && box.innerText.split(/\\s/)[0] === String(frame);
    }""", arg=frame, timeout=UI_TIMEOUT_MS)
    # two animation frames: the canvas and the regions' stage are redrawn on the next one
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.wait_for_timeout(300)


def video_on_screen(page) -> dict:
    """The video's place on screen: LS draws it on the canvas of ``.lsf-video-canvas__view``, scaled
    by min(1, canvas / video) and centred (VideoCanvas.tsx). CSS px = screenshot px (scale 1)."""
    state = page.evaluate("""() => {
        const v = document.querySelector('video');
        const c = document.querySelector('.lsf-video-canvas__view canvas').getBoundingClientRect();
        return {time: v.currentTime, width: v.videoWidth, height: v.videoHeight, canvas: [c.x, c.y, c.width, c.height],
                frames: document.querySelector('.lsf-frames-control').innerText};
    }""")
    x, y, w, h = state["canvas"]
    assert (state["width"], state["height"]) == (WIDTH, HEIGHT), state
    scale = min(1.0, w / WIDTH, h / HEIGHT)
    state.update(scale=scale, left=x + (w - WIDTH * scale) / 2, top=y + (h - HEIGHT * scale) / 2)
    return state


def picture_and_box(page) -> tuple[dict, int, tuple | None, tuple | None]:
    """``(state, burned index, green rectangle, red square)`` as seen on a screenshot, boxes XYXY
    in video pixels (None where no such pixel shows)."""
    state = video_on_screen(page)
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
    left, top, scale = state["left"], state["top"], state["scale"]
    xs = (left + (np.arange(WIDTH) + 0.5) * scale).astype(int)
    ys = (top + (np.arange(HEIGHT) + 0.5) * scale).astype(int)
    picture = shot[np.ix_(ys, xs)].astype(np.uint8)  # the video's own pixel grid, sampled on screen
    index = read_index(picture)

    x, y, w, h = state["canvas"]
    canvas = shot[int(y):int(y + h), int(x):int(x + w)]
    red, green, blue = canvas[..., 0], canvas[..., 1], canvas[..., 2]

    def bbox(mask) -> tuple | None:
        rows, cols = np.nonzero(mask)
        if not len(rows):
            return None
        x0, y0 = (int(x) + cols.min() - left) / scale, (int(y) + rows.min() - top) / scale
        x1, y1 = (int(x) + cols.max() + 1 - left) / scale, (int(y) + rows.max() + 1 - top) / scale
        return tuple(round(float(v), 2) for v in (x0, y0, x1, y1))

    rectangle = bbox((green > 200) & (red < 90) & (blue < 90))
    return state, index, rectangle, bbox((red > 150) & (green < 100) & (blue < 100))


def test_ls_shows_the_frame_and_the_track_box_the_prediction_says(label_studio, ls, chromium, tmp_path):
    clip = make_clip(tmp_path / "moving-square.mp4", frames=FRAMES, fps=FPS, size=(WIDTH, HEIGHT), square=SQUARE)
    project = ls.create_project("browser: a video track on screen", CONFIG)
    (task_id,) = ls.import_images(project, [clip])
    ls.post("/api/predictions", json={"task": task_id, "result": [TRACK], "model_version": "known track",
                                      "score": 0.9})

    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    try:
        with kept_on_failure(page, "video-track", label_studio):
            log_in(page, label_studio)
            page.goto(f"{label_studio.url}/projects/{project}/data?task={task_id}")
            page.locator(".lsf-video-canvas__view canvas").wait_for(state="visible", timeout=UI_TIMEOUT_MS)
            page.locator(".lsf-frames-control").get_by_text(f"of {FRAMES}").wait_for(timeout=UI_TIMEOUT_MS)

            # 8 and 30: between the keyframes (interpolated); 45: after the disabled keyframe 41
            for frame in (8, 30, 45):
                go_to_frame(page, frame)
                state, index, rectangle, square = picture_and_box(page)
                where = f"LS frame {frame} (video at {state['time']:.3f} s, frame box {state['frames']!r})"
                print(f"[browser video] {where}: picture {index}, rectangle {rectangle}, red square {square}")
                assert abs(state["time"] - ((frame - 1) / FPS + 0.002)) < 1e-3, f"{where}: LS seeked elsewhere"
                assert index == frame - 1, f"{where} shows the picture with index {index}, want {frame - 1}"
                want = track_box(frame)
                if want is None:
                    assert rectangle is None, f"{where}: a box is drawn at {rectangle} after the disabled keyframe"
                    continue
                assert rectangle is not None, f"{where}: no box drawn, the track says {want}"
                assert max(abs(g - w) for g, w in zip(rectangle, want)) <= TOLERANCE_PX, (
                    f"{where}: the box is drawn at {rectangle}, the track says {want}")
                # the keyframes sit on the square, so the box must frame this picture's square
                assert square is not None and max(abs(g - w) for g, w in zip(square, square_box(frame - 1, SQUARE))
                                                  ) <= TOLERANCE_PX + 2, f"{where}: the square is at {square}"

            go_to_frame(page, 30)
            save_flow_screenshot(page, FLOW_SHOT, README_SHOT)  # the video view: video, track, timeline
    finally:
        context.close()
