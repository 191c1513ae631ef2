"""Bitmask suggestions in a real browser: Debian's Chromium, driven by Playwright, against the suite's
real Label Studio 1.23 and a backend on the tiny models, as ``tests/test_e2e_browser.py`` checks
the brush.

An annotator opens a task of a ``<BitmaskLabels>`` project, switches Auto-Annotation on and submits
a prompt: the backend answers ``bitmasklabels`` regions (PNG data URLs), and LS draws each where its
PNG says, pixel for pixel: a screenshot before and after, reduced to the image's own pixel grid,
changed inside every decoded PNG mask and nowhere else. Accepted and submitted, the annotation LS
stores holds the same PNGs. Then a smart keypoint click comes back as one bitmask. Markers ``e2e``
and ``browser``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from backend.bitmask import png_to_mask
from tests.test_e2e_browser import (HEIGHT, UI_TIMEOUT_MS, WIDTH, check_drawn_where_rle_says, image_path,  # noqa: F401
                                    kept_on_failure, open_with_suggestions, pick_smart_keypoint, smart_config,
                                    stage_pixels, click_on_stage, wait_for_image)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# Bitmasks only (plus the smart keypoint tool), so every pixel the overlay changes belongs to a mask.
LABEL_CONFIG = smart_config('BitmaskLabels name="bm"')


def bitmask_masks(result: list) -> list[tuple[str, np.ndarray]]:
    """``[(label, bool (HEIGHT, WIDTH) mask)]`` of a result's bitmask regions (PNG alpha > 0)."""
    masks = []
    for region in result:
        if region.get("type") == "bitmasklabels":
            assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT), region
            masks.append((region["value"]["bitmasklabels"][0],
                          png_to_mask(region["value"]["imageDataURL"], HEIGHT, WIDTH)))
    return masks


def test_bitmask_suggestions_are_drawn_where_their_png_says(label_studio, ls, chromium, image_path, start_backend):
    project_id = ls.create_project("browser: bitmask suggestions", LABEL_CONFIG, show_collab_predictions=False)
    task_ids = ls.import_images(project_id, [image_path, image_path])
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    ls.connect_ml_backend(project_id, backend.url, "grounded-sam (browser, bitmask)", is_interactive=True)

    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    console_errors = []  # script errors; "Failed to load resource" is LS asking for other things (logged with the URL)
    page.on("console", lambda message: console_errors.append(message.text)
            if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    page.on("response", lambda r: print(f"[browser] {r.status} {r.url}") if r.status >= 400 else None)
    try:
        with kept_on_failure(page, "bitmask-prompt", label_studio, backend):
            open_with_suggestions(page, label_studio, project_id)
            before = stage_pixels(page)
            errors_before = len(console_errors)

            page.get_by_placeholder("Text prompt").fill("cat")
            with page.expect_response(lambda r: "/interactive-annotating" in r.url,
                                      timeout=UI_TIMEOUT_MS) as answer:
                page.get_by_role("button", name="Add").click()
            data = answer.value.json().get("data")
            assert data and data.get("result"), f"no suggestions in the interactive answer: {answer.value.text()[:500]}"
            assert {r["type"] for r in data["result"]} == {"bitmasklabels"}, data["result"][:1]
            suggested = bitmask_masks(data["result"])
            page.locator(".lsf-auto-accept__info").get_by_text(f"{len(suggested)} suggestions").wait_for(
                timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(1000)  # a bitmask decodes its PNG, then Konva draws on the next frames
            stats = check_drawn_where_rle_says("bitmask-prompt", before, stage_pixels(page), suggested)
            print(f"[browser] {len(suggested)} bitmask suggestions drawn where their PNG says: {stats}")
            new_errors = console_errors[errors_before:]
            assert not new_errors, f"the browser console logged errors while drawing bitmasks: {new_errors[:5]}"

            # accept; Submit; the annotation LS stored holds the same PNGs' masks
            page.get_by_test_id("bottombar-accept-suggestions-button").click()
            page.locator(".lsf-auto-accept__info").wait_for(state="detached", timeout=UI_TIMEOUT_MS)
            with page.expect_response(lambda r: re.search(r"/api/tasks/\d+/annotations", r.url)
                                      and r.request.method == "POST", timeout=UI_TIMEOUT_MS) as saved:
                page.get_by_role("button", name="Submit current annotation").click()
            assert saved.value.status == 201, saved.value.text()[:500]
            stored = bitmask_masks(ls.get(f"/api/annotations/{saved.value.json()['id']}")["result"])
            assert len(stored) == len(suggested)
            for (label, mask), (stored_label, stored_mask) in zip(suggested, stored):
                assert stored_label == label and np.array_equal(stored_mask, mask)

        with kept_on_failure(page, "bitmask-keypoint", label_studio, backend):
            # the next task: a smart keypoint click (label "dog") comes back as one dog bitmask
            page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_ids[1]}")
            wait_for_image(page)
            pick_smart_keypoint(page, "dog")
            before = stage_pixels(page)
            box = page.locator(".konvajs-content").first.bounding_box()
            fx, fy = 0.33, 0.45
            response = click_on_stage(page, fx, fy)
            masks = bitmask_masks((response.json().get("data") or {}).get("result") or [])
            assert len(masks) == 1 and masks[0][0] == "dog", response.text()[:500]
            page.locator(".lsf-auto-accept__info").get_by_text("1 suggestions").wait_for(timeout=UI_TIMEOUT_MS)
            page.mouse.move(box["x"] + box["width"] + 100, box["y"])  # no hover outline on the stage
            page.wait_for_timeout(1000)
            yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
            under_keypoint = (xx - fx * WIDTH) ** 2 + (yy - fy * HEIGHT) ** 2 <= 8 ** 2
            stats = check_drawn_where_rle_says("bitmask-keypoint", before, stage_pixels(page), masks,
                                               ignore=under_keypoint)
            print(f"[browser] smart keypoint click: one dog bitmask drawn where its PNG says: {stats}")
    finally:
        context.close()
