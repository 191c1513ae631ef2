"""Smart-tool refinement on the real tiny SAM: context parsing, the embedding cache, the regions."""

import base64
import threading

import numpy as np
import pytest
import torch

from backend.engine.embedcache import EmbeddingCache
from backend.ls.labelconfig import parse_label_config
from backend.pipeline.predict import Pipeline
from backend.results import CompactMask, MaskPrompt
from backend.rle import rle_to_mask
from backend.ls.smartprompt import parse_smart_prompt
from backend.ls.options import PredictOptions
from backend.ls.tasks import PredictRequest
from tests.test_protocol import png

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""


def keypoint(x, y, label="cat", positive=True, **extra):
    item = {"id": "k", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": 64, "original_height": 48, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}, **extra}
    if positive is not None:
        item["is_positive"] = positive
    return item


def rectangle(x, y, w, h, label="dog", rotation=0):
    return {"id": "r", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "original_width": 64, "original_height": 48, "image_rotation": 90,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def text(prompt):
    return {"id": "t", "from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": [prompt]}}


# ------------------------------------------------------------------ context parsing

def test_keypoints_positive_negative_and_missing_flag():
    smart = parse_smart_prompt({"result": [keypoint(10, 20), keypoint(30, 40, positive=False),
                                           keypoint(50, 60, label="dog", positive=None)]}, parse_label_config(CONFIG))
    assert [(c.x, c.y, c.positive, c.label) for c in smart.clicks] == [
        (10, 20, True, "cat"), (30, 40, False, "cat"), (50, 60, True, "dog")]  # missing flag = positive
    assert smart.boxes == ()


def test_rectangles_including_rotated_and_rotated_image_fields():
    smart = parse_smart_prompt({"result": [rectangle(10, 20, 30, 40), rectangle(50, 50, 10, 20, rotation=90)]},
                               parse_label_config(CONFIG))
    first, rotated = smart.boxes
    # on a 100x100 image a pixel is a percent on both axes (non-square images: tests/test_geometry.py)
    assert (*first.pixel_box(100, 100), first.label) == (10, 20, 40, 60, "dog")
    # rotated 90° clockwise about its top-left corner: it now extends left of x and down from y
    assert rotated.pixel_box(100, 100) == pytest.approx((30, 50, 50, 60))


def test_text_plus_keypoint_and_junk_is_ignored():
    context = {"result": [text("cat"), keypoint(5, 5), {"type": "keypointlabels", "value": {"x": "bad"}},
                          "junk", {**keypoint(1, 1), "to_name": "other-image"}]}
    smart = parse_smart_prompt(context, parse_label_config(CONFIG))
    assert len(smart.clicks) == 1 and not smart.boxes
    assert not parse_smart_prompt({"result": [text("cat")]}, parse_label_config(CONFIG))
    assert not parse_smart_prompt(None, parse_label_config(CONFIG))


# ------------------------------------------------------------------ the cache

class Sized:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def test_cache_evicts_least_recently_used_by_bytes():
    cache = EmbeddingCache(max_bytes=250)
    for key in "abc":
        cache.put(key, Sized(100))
    assert "a" not in cache and {"b", "c"} <= set(cache._entries) and cache.nbytes == 200
    cache.get("b")  # b is now the most recent: d evicts c
    cache.put("d", Sized(100))
    assert set(cache._entries) == {"b", "d"}
    cache.put("huge", Sized(1000))  # larger than the cache: not stored
    assert "huge" not in cache and cache.nbytes == 200


@pytest.fixture
def pipeline(tiny_settings):
    return Pipeline(tiny_settings)


def encoder_calls(pipeline) -> list:
    calls = []
    pipeline.engine().segmenter.model.vision_encoder.register_forward_hook(lambda *args: calls.append(1))
    return calls


def uri(width, height):
    return "data:image/png;base64," + base64.b64encode(png(width, height)).decode()


def predict(pipeline, image_url, *context_items, options: PredictOptions = PredictOptions()):
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": image_url}}], config=parse_label_config(CONFIG),
                             context={"result": list(context_items)}, options=options)
    predictions = pipeline.predict(request)
    assert len(predictions) == 1
    return predictions[0]


def test_n_clicks_on_one_image_run_the_encoder_once(pipeline):
    calls = encoder_calls(pipeline)
    image = uri(64, 48)
    for x in (20, 40, 60, 80):
        predict(pipeline, image, keypoint(x, 50))
    assert len(calls) == 1
    predict(pipeline, uri(48, 64), keypoint(50, 50))  # another image (content, not URL, is the key)
    assert len(calls) == 2
    metrics = pipeline.metrics
    assert metrics.embedding_cache_hits._value.get() == 3 and metrics.embedding_cache_misses._value.get() == 2
    assert metrics.embedding_cache_bytes._value.get() > 0


def test_text_prompt_warms_the_cache_for_the_next_click(pipeline):
    calls = encoder_calls(pipeline)
    image = uri(64, 48)
    predict(pipeline, image, text("cat"))
    predict(pipeline, image, text("cat"), keypoint(30, 30))
    assert len(calls) == 1


def test_eviction_makes_the_encoder_run_again(tiny_settings):
    from dataclasses import replace

    one_embedding = 32 * 16 * 16 * 4  # tiny SAM: (1, 32, 16, 16) float32
    pipeline = Pipeline(replace(tiny_settings, embedding_cache_mb=1.5 * one_embedding / 2**20))
    calls = encoder_calls(pipeline)
    first, second = uri(64, 48), uri(48, 64)
    predict(pipeline, first, keypoint(50, 50))
    predict(pipeline, second, keypoint(50, 50))  # evicts the first
    predict(pipeline, first, keypoint(50, 50))
    assert len(calls) == 3


def test_two_threads_on_different_images_get_their_own_masks(pipeline):
    images = [uri(64, 48), uri(40, 90)]
    alone = [predict(pipeline, image, keypoint(50, 50)) for image in images]
    together = [None, None]

    def click(index):
        for _ in range(3):
            together[index] = predict(pipeline, images[index], keypoint(50, 50))

    threads = [threading.Thread(target=click, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, b in zip(alone, together):
        assert [r["value"] for r in a["result"]] == [r["value"] for r in b["result"]]


# ------------------------------------------------------------------ regions

def test_click_gives_one_brush_and_its_bounding_rectangle_with_the_click_label(pipeline):
    prediction = predict(pipeline, uri(64, 48), keypoint(50, 50, label="dog"), keypoint(10, 10, positive=False))
    kinds = {r["type"]: r for r in prediction["result"]}
    assert set(kinds) == {"brushlabels", "rectanglelabels"}
    brush, rect = kinds["brushlabels"], kinds["rectanglelabels"]
    assert brush["value"]["brushlabels"] == ["dog"] and rect["value"]["rectanglelabels"] == ["dog"]
    mask = rle_to_mask(brush["value"]["rle"], 48, 64)
    x0, y0, x1, y1 = CompactMask.from_full(mask).box()
    assert rect["value"]["x"] == pytest.approx(100 * x0 / 64) and rect["value"]["width"] == pytest.approx(
        100 * (x1 - x0) / 64)
    assert 0 <= brush["score"] <= 1


def test_the_projects_outputs_apply_to_smart_tool_answers_and_thresholds_do_not(pipeline):
    click = keypoint(50, 50, label="dog")
    only_rectangles = predict(pipeline, uri(64, 48), click, options=PredictOptions(outputs=("rectangle",)))
    assert [r["type"] for r in only_rectangles["result"]] == ["rectanglelabels"]
    # an annotator's click is answered whatever the project's thresholds and minimum area
    strict = predict(pipeline, uri(64, 48), click, options=PredictOptions(box_threshold=1.0, min_mask_area=0.99))
    assert {r["type"] for r in strict["result"]} == {"brushlabels", "rectanglelabels"}


def test_a_click_whose_label_maps_to_no_output_label_is_counted_as_dropped(pipeline):
    config = CONFIG.replace('<KeyPointLabels name="click" toName="image" smart="true"><Label value="cat"/>',
                            '<KeyPointLabels name="click" toName="image" smart="true"><Label value="cow"/>')
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": uri(64, 48)}}], config=parse_label_config(config),
                             context={"result": [keypoint(50, 50, label="cow")]})
    assert pipeline.predict(request)[0]["result"] == []
    assert pipeline.metrics.dropped_detections.labels("no_label")._value.get() == 1


def test_text_plus_click_detects_at_the_projects_thresholds(pipeline):
    image = uri(64, 48)
    loose = predict(pipeline, image, text("cat"), keypoint(50, 50))
    strict = predict(pipeline, image, text("cat"), keypoint(50, 50), options=PredictOptions(box_threshold=1.0))
    # no detection passes a box threshold of 1.0, and with text the clicks only refine detections
    assert loose["result"] and strict["result"] == []


def test_several_boxes_give_one_mask_each(pipeline):
    prediction = predict(pipeline, uri(64, 48), rectangle(5, 5, 40, 40, label="cat"),
                         rectangle(50, 50, 40, 40, label="dog"))
    brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert len(brushes) <= 2 and {b["value"]["brushlabels"][0] for b in brushes} <= {"cat", "dog"}


def test_only_negative_clicks_give_an_empty_result_not_an_error(pipeline):
    prediction = predict(pipeline, uri(64, 48), keypoint(50, 50, positive=False))
    assert prediction["result"] == [] and prediction["model_version"]


def test_best_of_three_masks_by_predicted_iou(pipeline):
    engine = pipeline.engine()
    image = pipeline.loader.load(uri(64, 48))
    prompt = MaskPrompt(None, np.array([[30.0, 20.0]]), np.array([1]))
    (mask, score), = engine.refine(image.image, image.sha256, [prompt])
    segmenter = engine.segmenter
    embedding = segmenter.embed([image.image], [image.sha256])[0]
    points = segmenter._to_sam_frame(prompt.points, embedding, False)
    with torch.inference_mode():
        out = segmenter.model(image_embeddings=embedding.embeddings, multimask_output=True,
                              input_points=torch.tensor(points[None, None], dtype=torch.float32),
                              input_labels=torch.tensor([[[1]]]))
    assert score == pytest.approx(float(out.iou_scores[0, 0].max()))
    assert (mask.height, mask.width) == (48, 64) and mask.crop.dtype == bool


def test_text_plus_clicks_gives_each_detection_only_the_clicks_inside_its_box():
    from backend.pipeline.refine import plan_prompts
    from backend.results import Detections
    from backend.ls.smartprompt import Click, SmartPrompt

    detections = Detections(boxes=np.array([[0, 0, 32, 24], [32, 24, 64, 48]], np.float32),
                            scores=np.array([0.9, 0.8], np.float32), phrases=("cat", "dog"))
    smart = SmartPrompt(clicks=(Click(25, 25, True, "cat"), Click(75, 75, False, "dog"), Click(10, 90, True, "x")))
    prompts, labels = plan_prompts(smart, detections, 64, 48, "cat")
    assert labels == ["cat", "dog"]
    assert prompts[0].points.tolist() == [[16.0, 12.0]] and prompts[0].point_labels.tolist() == [1]
    assert prompts[1].points.tolist() == [[48.0, 36.0]] and prompts[1].point_labels.tolist() == [0]
    assert prompts[0].box.tolist() == [0, 0, 32, 24]
