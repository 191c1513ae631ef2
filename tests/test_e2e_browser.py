"""The annotator's flow in a real browser: Debian's Chromium, driven by Playwright, against the
suite's real Label Studio 1.23 and a backend on the tiny models.

What a person does and sees, step by step: log in, open a task from the Data Manager, switch
Auto-Annotation on, type a prompt and submit it, see the suggested masks drawn over the image,
accept them, Submit; and, on the next task, a smart keypoint click that comes back as a mask. The
masks are checked as a person would look at them: a screenshot of the image before and after the
suggestions arrive, reduced to the image's own pixel grid, must have changed inside every decoded
RLE mask and nowhere else (the overlay tints the pixels it covers).

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (``ensure_chromium``
in scripts/bootstrap.sh installs it). Markers ``e2e`` and ``browser``; skip locally with
``-m 'not browser'``. Screenshots of a failing step are kept in ``test-artifacts/browser/``.
"""

from __future__ import annotations

import io
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from backend.rle import rle_to_mask

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the chromium fixture (tests/conftest.py) skips (or fails, in CI) with the reason
    PlaywrightTimeout = TimeoutError

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "browser"
FLOW_SHOT = ARTIFACTS / "annotator-flow.png"  # every run; with UPDATE_DOCS_SCREENSHOT=1 also the README's:
README_SHOT = REPO / "docs" / "annotator-flow.png"

# Brush only (plus the smart keypoint tool), so every pixel the overlay changes belongs to a mask;
# rectangles would add outlines the RLE comparison would have to explain away.
def smart_config(mask_control: str) -> str:
    """A prompt box, the smart keypoint tool and one mask control (``BrushLabels name="mask"``,
    ``BitmaskLabels name="bm"``, ...) labelling cat and dog."""
    return f"""<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"
            placeholder="Text prompt, e.g. cat . red car"/>
  <KeyPointLabels name="click" toName="image" smart="true" smartOnly="true">
    <Label value="cat"/>
    <Label value="dog"/>
  </KeyPointLabels>
  <{mask_control} toName="image">
    <Label value="cat"/>
    <Label value="dog"/>
  </{mask_control.split()[0]}>
</View>"""


LABEL_CONFIG = smart_config('BrushLabels name="mask"')


def open_with_suggestions(page, label_studio, project_id: int) -> None:
    """Log in, open the project's first task from the Data Manager, turn Auto-Annotation on (LS
    then shows the model's suggestions) and take the pan tool (a mask tool floats its size slider
    over the image)."""
    log_in(page, label_studio)
    open_first_task_from_data_manager(page, label_studio, project_id)
    page.get_by_test_id("bottombar-auto-annotation-toggle").check(force=True)
    page.get_by_text("Auto-Accept Suggestions").wait_for(timeout=UI_TIMEOUT_MS)
    page.get_by_role("button", name="pan").click()


def pick_smart_keypoint(page, label: str) -> None:
    """Auto-Annotation on, then the smart tools' group (its button has no label) and the
    KeyPointLabels' ``label``: the first labels row, as :func:`smart_config` lists KeyPointLabels first."""
    page.get_by_test_id("bottombar-auto-annotation-toggle").check(force=True)
    page.locator("button.lsf-tool_smart:visible").first.click(timeout=UI_TIMEOUT_MS)
    page.locator(".lsf-labels").first.locator(".lsf-label", has_text=label).click()
    page.locator("button.lsf-tool_active[aria-label=key-point-tool]").wait_for(state="attached", timeout=UI_TIMEOUT_MS)
WIDTH, HEIGHT = 320, 240
UI_TIMEOUT_MS = 60_000  # LS's first page load compiles nothing, but 2 shared cores can be slow
MODEL_STAGES = ("images", "prepare", "engine", "regions", "refine")  # gsam_stage_seconds labels


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """A 320x240 PNG: a disc and a square on a pale background (colours far from LS's overlays)."""
    img = Image.new("RGB", (WIDTH, HEIGHT), (200, 220, 180))
    draw = ImageDraw.Draw(img)
    draw.ellipse([32, 36, 176, 168], fill=(230, 120, 20))
    draw.rectangle([192, 120, 294, 216], fill=(30, 60, 200))
    path = tmp_path_factory.mktemp("browser-images") / "shapes.png"
    img.save(path)
    return path


@contextmanager
def kept_on_failure(page, name: str, label_studio, backend=None):
    """On failure: a full-page screenshot in test-artifacts/browser/ (path printed) and log tails
    (the backend's too, when the test runs one)."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
            print(f"\n[browser] screenshot of the failure: {shot}")
        except Exception as exc:  # the page may be gone; the test's own error matters more
            print(f"\n[browser] no screenshot ({exc})")
        print(f"\n[browser] ---- Label Studio log tail ----\n{label_studio.log_tail(6000)}")
        if backend is not None:
            print(f"\n[browser] ---- backend log tail ----\n{backend.log_text()[-6000:]}")
        raise


# ---------------------------------------------------------------------------- helpers
def model_calls(backend_url: str) -> dict[str, float]:
    """What the backend's /metrics says it computed: pipeline stage runs and answered tasks."""
    from prometheus_client.parser import text_string_to_metric_families

    session = requests.Session()
    session.trust_env = False
    text = session.get(f"{backend_url}/metrics", timeout=30).text
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gsam_stage_seconds_count" and sample.labels.get("stage") in MODEL_STAGES:
                counts[f"stage:{sample.labels['stage']}"] = sample.value
            elif sample.name == "gsam_tasks_total":
                counts[f"tasks:{sample.labels['outcome']}"] = sample.value
            elif sample.name == "gsam_http_requests_total" and sample.labels.get("route") == "/predict":
                counts["predict_requests"] = counts.get("predict_requests", 0) + sample.value
    return counts


def log_in(page, label_studio) -> None:
    page.goto(f"{label_studio.url}/user/login/")
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=UI_TIMEOUT_MS)  # LS 1.23 lands on its home page


def open_first_task_from_data_manager(page, label_studio, project_id: int) -> None:
    page.goto(f"{label_studio.url}/projects/{project_id}/data")
    page.locator(".lsf-table-row").first.locator(".lsf-table__cell").nth(1).click(timeout=UI_TIMEOUT_MS)
    wait_for_image(page)


def click_on_stage(page, fx: float, fy: float):
    """Click the stage at (``fx``, ``fy``) of its width and height with the tool in hand; LS's
    interactive-annotating response to it."""
    box = page.locator(".konvajs-content").first.bounding_box()
    with page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=UI_TIMEOUT_MS) as answer:
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    return answer.value


def wait_for_image(page) -> None:
    """Until the labeling stage shows the task's image (decoded, laid out) and has settled."""
    page.wait_for_function("() => { const i = document.querySelector('img[alt=image]');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=UI_TIMEOUT_MS)
    page.locator(".konvajs-content").first.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(500)  # Konva draws on the next animation frames


def stage_pixels(page) -> tuple[np.ndarray, np.ndarray]:
    """The image as the annotator sees it, sampled at the centre of each image pixel.

    Returns ``(pixels, visible)``: uint8 (HEIGHT, WIDTH, 3) in the image's own frame, and bool
    (HEIGHT, WIDTH), False where that pixel is not on screen: outside the stage (LS may show the
    image zoomed a little past the stage's edges) or under the floating tool bar.
    """
    geometry = page.evaluate("""() => {
        const box = e => { const b = e.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; };
        return {image: box(document.querySelector('img[alt=image]')),
                stage: box(document.querySelector('.konvajs-content')),
                covers: [...document.querySelectorAll('.lsf-toolbar, .lsf-toolbar *')].map(box)};
    }""")
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    x0, y0, width, height = geometry["image"]
    xs = x0 + (np.arange(WIDTH) + 0.5) * width / WIDTH  # CSS px = screenshot px (device scale 1)
    ys = y0 + (np.arange(HEIGHT) + 0.5) * height / HEIGHT
    gx, gy = np.meshgrid(xs, ys)

    def inside(rect) -> np.ndarray:
        rx, ry, rw, rh = rect
        return (gx >= rx) & (gx < rx + rw) & (gy >= ry) & (gy < ry + rh)

    visible = inside(geometry["stage"]) & inside([0, 0, shot.shape[1], shot.shape[0]])
    for rect in geometry["covers"]:
        visible &= ~inside(rect)
    rows = np.clip(gy.astype(int), 0, shot.shape[0] - 1)
    cols = np.clip(gx.astype(int), 0, shot.shape[1] - 1)
    return shot[rows, cols], visible


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood lies in ``mask``: edges blur when the stage is scaled."""
    padded = np.pad(mask, 1, mode="edge")
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def brush_masks(result: list) -> list[tuple[str, np.ndarray]]:
    """``[(label, bool (HEIGHT, WIDTH) mask)]`` of a result's brush regions (RLE decoded)."""
    masks = []
    for region in result:
        if region.get("type") == "brushlabels":
            assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT), region
            mask = np.asarray(rle_to_mask(region["value"]["rle"], HEIGHT, WIDTH)).astype(bool)
            masks.append((region["value"]["brushlabels"][0], mask))
    return masks


def check_drawn_where_rle_says(name: str, before: tuple, after: tuple, masks: list, ignore=None) -> dict:
    """Each mask's interior changed on screen, and the image outside every mask did not.

    ``changed``: any RGB channel moved by more than 24 (LS tints a mask with its label colour at
    ~0.6 opacity: far more than that on every colour of the test image). ``before``/``after``:
    :func:`stage_pixels`; only pixels on screen in both count. ``ignore``: bool (HEIGHT, WIDTH),
    pixels left out as well (e.g. under the keypoint LS draws).
    Returns the fractions, for the log. On failure the before/after/changed/mask images are kept
    in test-artifacts/browser/ as ``NAME-*.png``.
    """
    (before, seen_before), (after, seen_after) = before, after
    changed = (np.abs(after.astype(int) - before.astype(int)).max(axis=2) > 24)
    seen = seen_before & seen_after
    assert seen.mean() > 0.8, f"only {seen.mean():.0%} of the image is on screen"
    union = np.zeros((HEIGHT, WIDTH), bool)
    try:
        return _compare(changed, masks, union, seen if ignore is None else seen & ~ignore)
    except AssertionError:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for suffix, array in (("before", before), ("after", after), ("changed", changed * 255),
                              ("masks", union * 255)):
            Image.fromarray(np.asarray(array, np.uint8)).save(ARTIFACTS / f"{name}-{suffix}.png")
        print(f"\n[browser] screen vs RLE images: {ARTIFACTS}/{name}-{{before,after,changed,masks}}.png")
        raise


def _compare(changed: np.ndarray, masks: list, union: np.ndarray, seen: np.ndarray) -> dict:
    stats = {}
    for i, (label, mask) in enumerate(masks):
        inside = interior(mask) & seen
        assert inside.sum() > 50, f"mask #{i} ({label}) has only {inside.sum()} interior pixels: nothing to see"
        stats[f"mask{i}_inside_changed"] = round(float(changed[inside].mean()), 4)
        union |= mask
    outside = interior(~union) & seen
    stats["outside_changed"] = round(float(changed[outside].mean()), 4) if outside.any() else 0.0
    stats["outside_pixels"] = int(outside.sum())
    for i, (label, _) in enumerate(masks):
        assert stats[f"mask{i}_inside_changed"] >= 0.98, (
            f"mask #{i} ({label}) is not drawn where its RLE says: only {stats[f'mask{i}_inside_changed']:.1%} "
            f"of its interior changed on screen ({stats})")
    assert outside.sum() > 200, f"the masks cover nearly the whole image: nothing to compare outside ({stats})"
    assert stats["outside_changed"] <= 0.02, (
        f"{stats['outside_changed']:.1%} of the image outside every mask changed on screen: an overlay is "
        f"drawn where no RLE says ({stats})")
    return stats


def save_flow_screenshot(page, flow_shot: Path = FLOW_SHOT, readme_shot: Path = README_SHOT) -> None:
    """The labeling view, small (palette PNG): test-artifacts/browser/, and docs/ (the README's
    picture) only when asked, so a test run leaves the work tree clean."""
    png = page.screenshot(clip={"x": 240, "y": 50, "width": 1160, "height": 850})
    small = Image.open(io.BytesIO(png)).convert("RGB").resize((696, 510), Image.LANCZOS)
    small = small.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    targets = [flow_shot] + ([readme_shot] if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1" else [])
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        small.save(target, optimize=True)
    print(f"[browser] the flow's screenshot: {', '.join(map(str, targets))}")


# ---------------------------------------------------------------------------- the test
def test_annotator_prompts_accepts_submits_and_clicks(label_studio, ls, chromium, image_path, start_backend):
    # "Use predictions to pre-label" off: opening a task asks nothing, so the canvas starts clean and
    # every call the backend sees is one the annotator made
    project_id = ls.create_project("browser: the annotator's flow", LABEL_CONFIG, show_collab_predictions=False)
    task_ids = ls.import_images(project_id, [image_path, image_path])
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    ml_id = ls.connect_ml_backend(project_id, backend.url, "grounded-sam (browser)", is_interactive=True)
    assert ls.ml_backend(ml_id)["state"] == "CO"

    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    ml_calls = []  # every interactive-annotating request the page sends, in order
    page.on("request", lambda r: ml_calls.append(r) if "/interactive-annotating" in r.url else None)
    try:
        with kept_on_failure(page, "prompt-accept-submit", label_studio, backend):
            # 1. log in; open the task from the Data Manager; Auto-Annotation on
            open_with_suggestions(page, label_studio, project_id)
            before = stage_pixels(page)
            calls_before = model_calls(backend.url)

            # 2. type a prompt and submit it; the interactive call, then the suggestions on screen
            page.get_by_placeholder("Text prompt").fill("cat")
            with page.expect_response(lambda r: "/interactive-annotating" in r.url,
                                      timeout=UI_TIMEOUT_MS) as answer:
                page.get_by_role("button", name="Add").click()
            data = answer.value.json().get("data")
            assert data and data.get("result"), f"no suggestions in the interactive answer: {answer.value.text()[:500]}"
            suggested = brush_masks(data["result"])
            assert suggested and {label for label, _ in suggested} == {"cat"}, data["result"][:1]
            page.locator(".lsf-auto-accept__info").get_by_text(f"{len(suggested)} suggestions").wait_for(
                timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(500)  # the masks' bitmaps are drawn on the frames after the count
            after = stage_pixels(page)
            stats = check_drawn_where_rle_says("prompt", before, after, suggested)
            print(f"[browser] {len(suggested)} suggestions drawn where their RLE says: {stats}")
            save_flow_screenshot(page)

            # 3. accept; Submit; the annotation LS stored holds exactly the accepted masks
            page.get_by_test_id("bottombar-accept-suggestions-button").click()
            page.locator(".lsf-auto-accept__info").wait_for(state="detached", timeout=UI_TIMEOUT_MS)
            calls_at_submit = model_calls(backend.url)
            log_at_submit = len(backend.log_text())
            ml_calls_at_submit = len(ml_calls)
            with page.expect_response(lambda r: re.search(r"/api/tasks/\d+/annotations", r.url)
                                      and r.request.method == "POST", timeout=UI_TIMEOUT_MS) as saved:
                page.get_by_role("button", name="Submit current annotation").click()
            assert saved.value.status == 201, saved.value.text()[:500]
            annotation_id = saved.value.json()["id"]
            # LS 1.23's frontend sends an interactive call with {"result": []} a few seconds after the
            # save (the defect: it used to bring back a full detection); wait for it to finish
            try:
                page.wait_for_event("requestfinished", lambda r: "/interactive-annotating" in r.url, timeout=30_000)
            except PlaywrightTimeout:
                print("[browser] LS sent no interactive call after Submit within 30 s")
            page.wait_for_load_state("networkidle", timeout=UI_TIMEOUT_MS)

            annotation = ls.get(f"/api/annotations/{annotation_id}")
            stored = brush_masks(annotation["result"])
            assert len(stored) == len(suggested), (
                f"the saved annotation has {len(stored)} masks, {len(suggested)} were suggested and accepted")
            for i, ((label, mask), (stored_label, stored_mask)) in enumerate(zip(suggested, stored)):
                assert stored_label == label and np.array_equal(stored_mask, mask), f"saved mask #{i} differs"
            assert not ls.predictions(task_ids[0]), "an interactive answer was stored as a prediction"

            # 4. nothing after Submit: no model call, no new suggestion (LS 1.23 does send an
            # interactive call with {"result": []}: it must come back empty)
            assert ml_calls_at_submit == 1, f"{ml_calls_at_submit} interactive calls before Submit, expected the prompt's"
            after_submit = ml_calls[ml_calls_at_submit:]
            for call in after_submit:
                answer_body = call.response().json()
                assert not ((answer_body or {}).get("data") or {}).get("result"), (
                    f"the call after Submit ({call.post_data}) brought suggestions: {str(answer_body)[:500]}")
            calls_now = model_calls(backend.url)
            log_after_submit = backend.log_text()[log_at_submit:]
            print(f"[browser] backend log after Submit:\n{log_after_submit}")
            assert not re.search(r"predict: \d+ tasks, \d+ regions|task \S+: \d+ regions", log_after_submit), (
                f"a prediction was made after Submit:\n{log_after_submit}")
            model_only = {k: v for k, v in calls_now.items() if k != "predict_requests"}
            assert model_only == {k: v for k, v in calls_at_submit.items() if k != "predict_requests"}, (
                f"the backend ran its models after Submit: {calls_at_submit} -> {calls_now}")
            assert calls_at_submit != calls_before, "the metrics did not see the prompt's own model call"
            assert page.locator(".lsf-auto-accept__info").count() == 0, "suggestions appeared after Submit"
            print(f"[browser] after Submit: {len(after_submit)} interactive call(s) from LS, all empty; "
                  f"/predict requests {calls_at_submit.get('predict_requests')} -> {calls_now.get('predict_requests')}, "
                  f"no model stage ran")

        with kept_on_failure(page, "smart-keypoint", label_studio, backend):
            # 5. the next task: a smart keypoint click (label "dog") comes back as a dog mask
            page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_ids[1]}")
            wait_for_image(page)
            pick_smart_keypoint(page, "dog")
            before = stage_pixels(page)
            box = page.locator(".konvajs-content").first.bounding_box()
            fx, fy = 0.33, 0.45
            response = click_on_stage(page, fx, fy)
            request_body = response.request.post_data_json
            clicks = [r for r in request_body["context"]["result"] if r.get("type") == "keypointlabels"]
            assert len(clicks) == 1 and clicks[0]["value"]["keypointlabels"] == ["dog"], request_body
            data = response.json().get("data") or {}
            masks = brush_masks(data.get("result") or [])
            assert len(masks) == 1 and masks[0][0] == "dog", f"smart click answer: {str(data)[:500]}"
            page.locator(".lsf-auto-accept__info").get_by_text("1 suggestions").wait_for(timeout=UI_TIMEOUT_MS)
            page.mouse.move(box["x"] + box["width"] + 100, box["y"])  # no hover outline on the stage
            page.wait_for_timeout(500)
            yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
            under_keypoint = (xx - fx * WIDTH) ** 2 + (yy - fy * HEIGHT) ** 2 <= 8 ** 2
            stats = check_drawn_where_rle_says("keypoint", before, stage_pixels(page), masks, ignore=under_keypoint)
            print(f"[browser] smart keypoint click: one dog mask drawn where its RLE says: {stats}")
    finally:
        context.close()
