"""Which detections become regions: model_score_threshold (label → control → options → env),
per-request detector thresholds, minimum mask area, cap per label, output kinds.

Selection alone runs on stub detections (``stub_result``: hand-made scores and masks, so each rule
is checked exactly); the per-request thresholds run on the real tiny models; a bad attribute is
checked over real HTTP."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import replace

import numpy as np
import pytest
import requests
from PIL import Image

from backend.ls.labelconfig import LabelConfigError, parse_label_config
from backend.ls.options import PredictOptions
from backend.ls.regions import build_mask_prediction, build_prediction
from backend.ls.selection import DropReason, SelectDefaults, request_thresholds, select_detections
from backend.ls.tasks import PredictRequest
from backend.pipeline.predict import Pipeline
from backend.results import CompactMask, Detections, ImageResult, LabeledMasks, PromptedMask
from backend.settings import DetectThresholds, Settings, SettingsError

# cat: own threshold 0.2 on the rectangle control; dog: the rectangle control's 0.5; bird: no
# attribute anywhere (options, then env). The brush control has no thresholds at all.
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="box" toName="image" model_score_threshold="0.5">'
          '<Label value="cat" model_score_threshold="0.2"/><Label value="dog"/></RectangleLabels>'
          '<BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/>'
          '<Label value="bird"/></BrushLabels></View>')
PLAIN = ('<View><Image name="image" value="$image"/>'
         '<RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>'
         '<BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels></View>')


def stub_result(rows, width=100, height=50) -> ImageResult:
    """Stub detections: ``rows`` of (phrase, score, mask area in pixels), each mask a block of rows."""
    boxes, masks = [], []
    for _, _, area in rows:
        full = np.zeros((height, width), bool)
        full.flat[:area] = True
        masks.append(CompactMask.from_full(full))
        boxes.append([0, 0, width, max(1, -(-area // width))])
    scores = np.array([score for _, score, _ in rows], np.float32)
    return ImageResult(width, height, Detections(np.array(boxes, np.float32).reshape(-1, 4), scores,
                                                 tuple(p for p, _, _ in rows)), tuple(masks))


def kept(selection) -> list[tuple[str, float, tuple[str, ...]]]:
    return [(item.label, round(item.score, 3), item.kinds) for item in selection.kept]


# ------------------------------------------------------------------------------ precedence (stub detections)

def test_label_threshold_wins_over_the_control_over_options_over_env():
    config = parse_label_config(CONFIG)
    result = stub_result([("cat", 0.9, 10), ("dog", 0.45, 10), ("bird", 0.35, 10), ("cat", 0.25, 10),
                          ("dog", 0.15, 10), ("bird", 0.12, 10)])
    env_only = select_detections(result, config, PredictOptions(), SelectDefaults(box_threshold=0.1))
    assert kept(env_only) == [
        ("cat", 0.9, ("rectangle", "brush")),
        ("dog", 0.45, ("brush",)),             # the rectangle control wants > 0.5; the brush only the env's 0.1
        ("bird", 0.35, ("brush",)),
        ("cat", 0.25, ("rectangle", "brush")),  # the label's 0.2 beats the control's 0.5
        ("dog", 0.15, ("brush",)),
        ("bird", 0.12, ("brush",)),
    ]
    with_options = select_detections(result, config, PredictOptions(box_threshold=0.3),
                                     SelectDefaults(box_threshold=0.1))
    assert kept(with_options) == [
        ("cat", 0.9, ("rectangle", "brush")),
        ("dog", 0.45, ("brush",)),
        ("bird", 0.35, ("brush",)),            # options' 0.3 replaces the env's 0.1 where nothing is set
        ("cat", 0.25, ("rectangle",)),         # the label's 0.2 holds on its control only
    ]
    assert with_options.dropped == {DropReason.BELOW_THRESHOLD: 2}


def test_a_score_must_exceed_its_threshold():
    config = parse_label_config(CONFIG)
    result = stub_result([("cat", 0.2, 10), ("dog", 0.5, 10)])
    selection = select_detections(result, config, PredictOptions(box_threshold=0.5))
    assert selection.kept == [] and selection.dropped == {DropReason.BELOW_THRESHOLD: 2}  # not 0.2 > 0.2, 0.5 > 0.5


def test_the_detector_runs_at_the_lowest_threshold_any_label_needs():
    base = DetectThresholds(box=0.3, text=0.25, nms=0.7, max_detections=100)
    assert request_thresholds(parse_label_config(PLAIN), PredictOptions(), base) == base
    assert request_thresholds(parse_label_config(CONFIG), PredictOptions(), base).box == 0.2  # cat's own
    options = PredictOptions(box_threshold=0.1, text_threshold=0.05, nms_threshold=0.5, max_detections=7)
    assert request_thresholds(parse_label_config(CONFIG), options, base) == DetectThresholds(0.1, 0.05, 0.5, 7)
    # Only the kinds the project asks for count: without rectangles, no 0.2 is needed.
    only_brush = PredictOptions(outputs=("brush",))
    assert request_thresholds(parse_label_config(CONFIG), only_brush, base).box == 0.3


def test_phrases_are_mapped_once_and_unknown_ones_counted():
    selection = select_detections(stub_result([("cat", 0.9, 5), ("truck", 0.8, 5), ("truck", 0.7, 5)]),
                                  parse_label_config(PLAIN))
    assert [item.label for item in selection.kept] == ["cat"]
    assert selection.unmapped_phrases == {"truck": 2} and selection.dropped == {DropReason.UNMAPPED: 2}


# ------------------------------------------------------------------------------ area, cap, outputs (stub detections)

def test_min_mask_area_in_pixels_and_as_a_fraction_of_the_image():
    result = stub_result([("cat", 0.9, 30), ("dog", 0.8, 500), ("cat", 0.7, 499)], width=100, height=50)
    config = parse_label_config(PLAIN)
    pixels = select_detections(result, config, PredictOptions(min_mask_area=31))
    assert [i.score for i in pixels.kept] == pytest.approx([0.8, 0.7])
    assert pixels.dropped == {DropReason.SMALL_MASK: 1}
    fraction = select_detections(result, config, PredictOptions(min_mask_area=0.1))  # 10% of 5000 = 500
    assert [i.score for i in fraction.kept] == pytest.approx([0.8])
    from_env = select_detections(result, config, PredictOptions(), SelectDefaults(min_mask_area=0.1))
    assert kept(from_env) == kept(fraction)
    options_over_env = select_detections(result, config, PredictOptions(min_mask_area=1),
                                         SelectDefaults(min_mask_area=0.1))
    assert len(options_over_env.kept) == 3


def test_max_per_label_keeps_the_best_scores():
    # Out of order on purpose: the cap keeps the top scores, not the first ones.
    result = stub_result([("cat", 0.5, 5), ("dog", 0.6, 5), ("cat", 0.9, 5), ("cat", 0.7, 5), ("dog", 0.4, 5)])
    config = parse_label_config(PLAIN)
    capped = select_detections(result, config, PredictOptions(max_per_label=2))
    assert [(i.label, round(i.score, 3)) for i in capped.kept] == [("cat", 0.9), ("cat", 0.7), ("dog", 0.6),
                                                                    ("dog", 0.4)]
    assert capped.dropped == {DropReason.LABEL_CAP: 1}
    from_env = select_detections(result, config, PredictOptions(), SelectDefaults(max_per_label=1))
    assert [(i.label, round(i.score, 3)) for i in from_env.kept] == [("cat", 0.9), ("dog", 0.6)]


def test_outputs_pick_the_region_kinds():
    result = stub_result([("cat", 0.9, 20), ("dog", 0.8, 20)])
    config = parse_label_config(PLAIN)
    every = build_prediction(result, config, "v")[0]["result"]
    assert sorted(r["type"] for r in every) == ["brushlabels"] * 2 + ["rectanglelabels"] * 2
    brush = build_prediction(result, config, "v", options=PredictOptions(outputs=("brush",)))[0]["result"]
    assert [r["type"] for r in brush] == ["brushlabels"] * 2
    # A kind the config lacks yields nothing, and is not an error.
    none, stats = build_prediction(result, config, "v", options=PredictOptions(outputs=("polygon",)))
    assert none["result"] == [] and stats.dropped == {DropReason.NOT_IN_OUTPUTS: 2}


def test_smart_tool_masks_are_not_filtered():
    config = parse_label_config(CONFIG.replace('model_score_threshold="0.2"', 'model_score_threshold="0.99"'))
    mask = CompactMask.from_full(np.pad(np.ones((2, 2), bool), 4))
    prediction = build_mask_prediction(LabeledMasks(10, 10, (PromptedMask("cat", mask, 0.3),)), config, "v")
    assert sorted(r["type"] for r in prediction["result"]) == ["brushlabels", "rectanglelabels"]


# ------------------------------------------------------------------------------ config and env values

@pytest.mark.parametrize("where, value", [
    ("control", "high"), ("control", "1.5"), ("label", "-0.1"), ("label", "nan"), ("label", ""),
])
def test_bad_model_score_threshold_is_a_config_error(where, value):
    if where == "control":
        xml = PLAIN.replace('<RectangleLabels name="box"', f'<RectangleLabels model_score_threshold="{value}" name="box"')
    else:
        xml = PLAIN.replace('<Label value="dog"/></BrushLabels>',
                            f'<Label value="dog" model_score_threshold="{value}"/></BrushLabels>')
    with pytest.raises(LabelConfigError, match="model_score_threshold.*use a number in \\[0, 1\\]"):
        parse_label_config(xml)


def test_thresholds_are_parsed_per_control_and_label():
    config = parse_label_config(CONFIG)
    assert config.rectangle.threshold_for("cat") == 0.2 and config.rectangle.threshold_for("dog") == 0.5
    assert config.brush.threshold_for("cat") is None


def test_env_min_mask_area_and_max_detections_per_label():
    settings = Settings.from_env({"MIN_MASK_AREA": "0.02", "MAX_DETECTIONS_PER_LABEL": "3"})
    assert (settings.min_mask_area, settings.max_detections_per_label) == (0.02, 3)
    assert SelectDefaults.from_settings(settings) == SelectDefaults(0.3, 0.02, 3)
    assert Settings.from_env({}).max_detections_per_label is None and Settings().min_mask_area == 0.0
    for env in ({"MIN_MASK_AREA": "-1"}, {"MIN_MASK_AREA": "nan"}, {"MAX_DETECTIONS_PER_LABEL": "0"}):
        with pytest.raises(SettingsError, match=next(iter(env))):
            Settings.from_env(env)


# ------------------------------------------------------------------------------ the real tiny models

def noise_uri(seed: int, width: int = 320, height: int = 240) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def predict(pipeline, config=PLAIN, seeds=(0, 1), **options) -> list[dict]:
    request = PredictRequest(tasks=[{"id": s, "data": {"image": noise_uri(s)}} for s in seeds],
                             config=parse_label_config(config), context=None, options=PredictOptions(**options))
    return pipeline.predict(request)


def without_ids(predictions: list[dict]) -> list[dict]:
    return [{**p, "result": [{k: v for k, v in r.items() if k != "id"} for r in p["result"]]} for p in predictions]


def rectangles(prediction: dict) -> list[tuple[str, float]]:
    return [(r["value"]["rectanglelabels"][0], r["score"]) for r in prediction["result"]
            if r["type"] == "rectanglelabels"]


def test_per_image_thresholds_in_one_batch_equal_each_image_alone(engine):
    images = [Image.open(io.BytesIO(base64.b64decode(noise_uri(s).split(",")[1]))).convert("RGB") for s in (0, 1)]
    phrases = [["cat", "dog"]] * 2
    wide = DetectThresholds(box=0.0, text=0.0, nms=0.9, max_detections=30)
    batched = engine.run(images, phrases, thresholds=[wide, None])
    assert len(batched[0].detections) > 5 and len(batched[1].detections) == 5  # None: MAX_DETECTIONS=5
    alone = engine.run(images[:1], phrases[:1], thresholds=[wide])[0]
    default = engine.run(images[1:], phrases[1:])[0]
    for got, want in ((batched[0], alone), (batched[1], default)):
        assert got.detections.phrases == want.detections.phrases
        np.testing.assert_allclose(got.detections.boxes, want.detections.boxes, atol=1e-3)
        np.testing.assert_allclose(got.detections.scores, want.detections.scores, atol=1e-5)


def test_the_default_request_answers_as_before(tiny_settings, engine):
    """No options and no attributes: the engine's own call and the plain phrase → label mapping."""
    pipeline = Pipeline(tiny_settings, engine_factory=lambda: engine)
    answers = predict(pipeline)
    images = [pipeline.loader.load(noise_uri(s)).image for s in (0, 1)]
    config = parse_label_config(PLAIN)
    before = [build_prediction(result, config, pipeline.model_version)[0]
              for result in engine.run(images, [config.default_phrases()] * 2)]
    assert without_ids(answers) == without_ids(before) and all(len(rectangles(a)) == 5 for a in answers)
    env_as_options = predict(pipeline, box_threshold=0.0, text_threshold=0.0, nms_threshold=0.7, max_detections=5)
    assert without_ids(env_as_options) == without_ids(answers)


def test_request_options_change_what_the_tiny_pipeline_returns(tiny_settings, engine):
    pipeline = Pipeline(tiny_settings, engine_factory=lambda: engine)
    wide = predict(pipeline, max_detections=30)
    scores = [s for _, s in rectangles(wide[0])]
    assert len(scores) > 5, "max_detections from the options replaces MAX_DETECTIONS=5"
    cut = (scores[8] + scores[9]) / 2 if scores[8] != scores[9] else scores[8]
    above = predict(pipeline, max_detections=30, box_threshold=cut, seeds=(0,))[0]
    assert [s for _, s in rectangles(above)] == [s for s in scores if s > cut] and len(rectangles(above)) <= 9
    one_each = rectangles(predict(pipeline, max_detections=30, max_per_label=1, seeds=(0,))[0])
    best = {label: max(s for lab, s in rectangles(wide[0]) if lab == label) for label, _ in one_each}
    assert sorted(label for label, _ in one_each) == sorted(set(label for label, _ in rectangles(wide[0])))
    assert all(score == best[label] for label, score in one_each)
    image = pipeline.loader.load(noise_uri(0)).image
    result = engine.run([image], [parse_label_config(PLAIN).default_phrases()])[0]
    areas = [int(m.crop.sum()) for m in result.masks]
    cut = sorted(areas)[len(areas) // 2]
    big = rectangles(predict(pipeline, min_mask_area=cut, seeds=(0,))[0])
    assert [s for _, s in big] == [float(s) for s, a in zip(result.detections.scores, areas) if a >= cut]
    fraction = rectangles(predict(pipeline, min_mask_area=cut / (image.width * image.height), seeds=(0,))[0])
    assert fraction == big and 0 < len(big) < 5


@pytest.fixture(scope="module")
def strict_engine(tiny_settings):
    """The tiny models with a high BOX_THRESHOLD: most of their boxes score under it."""
    from backend.engine.engine import Engine

    settings = replace(tiny_settings, box_threshold=0.9999, max_detections=30)
    return settings, Engine.from_settings(settings)


def test_a_label_threshold_under_the_projects_lowers_the_detectors(strict_engine):
    settings, engine = strict_engine
    pipeline = Pipeline(settings, engine_factory=lambda: engine)
    strict = rectangles(predict(pipeline, seeds=(0,))[0])
    assert strict and all(score > 0.9999 for _, score in strict)
    # cat's rectangles may score down to 0.01; its brush and all of dog keep the project's 0.9999
    lenient_cat = PLAIN.replace('<Label value="cat"/>', '<Label value="cat" model_score_threshold="0.01"/>', 1)
    regions = rectangles(predict(pipeline, config=lenient_cat, seeds=(0,))[0])
    assert any(label == "cat" and score <= 0.9999 for label, score in regions), "cat gets its low-score boxes"
    assert all(score > 0.9999 for label, score in regions if label == "dog"), "dog keeps the project's"
    assert set(strict) <= set(regions)


# ------------------------------------------------------------------------------ over real HTTP

def test_a_bad_model_score_threshold_is_400_from_predict(start_backend):
    backend = start_backend(PRELOAD_MODELS="false")
    config = PLAIN.replace('<Label value="dog"/></BrushLabels>',
                           '<Label value="dog" model_score_threshold="0,4"/></BrushLabels>')
    body = {"tasks": [{"id": 1, "data": {"image": noise_uri(0, 32, 24)}}], "label_config": config,
            "project": "1.1", "params": {"context": None}}
    response = requests.post(backend.url + "/predict", json=body, timeout=60)
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert 'model_score_threshold="0,4"' in message and '<Label value="dog">' in message and "[0, 1]" in message
    good = requests.post(backend.url + "/predict", json={**body, "label_config": CONFIG}, timeout=120)
    assert good.status_code == 200 and len(good.json()["results"]) == 1


# ------------------------------------------------------------------------------ dropped detections in /metrics

METRICS_CONFIG = ('<View><Image name="image" value="$image"/>'
                  '<RectangleLabels name="box" toName="image"><Label value="cat"/>'
                  '<Label value="dog" model_score_threshold="0.5"/></RectangleLabels>'
                  '<BrushLabels name="mask" toName="image"><Label value="bird"/></BrushLabels></View>')
#: (phrase, score, box): per reason a different number of drops, so no two reasons can be swapped
STUB_ROWS = ([("cat", 0.9, (0, 0, 20, 10))]  # kept
             + [("truck", 0.9, (0, 0, 20, 10))]  # no_label: 1
             + [("dog", s, (0, 0, 20, 10)) for s in (0.3, 0.4)]  # threshold (dog's 0.5): 2
             + [("cat", s, (0, 0, 2, 1)) for s in (0.97, 0.96, 0.95)]  # area (2 px < 10): 3
             + [("cat", s, (0, 0, 20, 10)) for s in (0.8, 0.79, 0.78, 0.77)]  # per_label_cap (1 per label): 4
             + [("bird", 0.9, (0, 0, 20, 10))] * 5)  # not_in_outputs (only rectangles asked for): 5


class RowsStubDetector:
    """Stub detector: ``STUB_ROWS`` for every image, whatever the phrases and thresholds."""

    def detect(self, images, phrases, thresholds=None):
        boxes = np.array([box for _, _, box in STUB_ROWS], np.float32)
        scores = np.array([score for _, score, _ in STUB_ROWS], np.float32)
        return [Detections(boxes, scores, tuple(p for p, _, _ in STUB_ROWS)) for _ in images]


def dropped_metrics(client) -> dict[str, float]:
    text = client.get("/metrics").get_data(as_text=True)
    found = re.findall(r'^gsam_dropped_detections_total\{reason="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def test_smart_tool_text_detections_under_their_labels_threshold_are_counted():
    from backend.ls.selection import Selection, above_own_threshold

    detections = stub_result([("cat", 0.3, 5), ("dog", 0.15, 5), ("truck", 0.9, 5), ("bird", 0.1, 5)]).detections
    selection = Selection()
    kept_detections = above_own_threshold(detections, parse_label_config(CONFIG), PredictOptions(), 0.2, selection)
    # cat clears its own 0.2; dog neither the rectangles' 0.5 nor the brush's default 0.2; bird not 0.2;
    # truck maps to no label: kept here, dropped (and counted) by the caller when it maps its mask
    assert kept_detections.phrases == ("cat", "truck")
    assert selection.dropped == {DropReason.BELOW_THRESHOLD: 2}


def test_dropped_detections_are_counted_by_reason_in_metrics(tiny_settings):
    from backend.engine.engine import Engine
    from backend.modes.embedded import EmbeddedBackend
    from backend.web.app import create_app
    from tests.test_geometry import BoxFillStubSegmenter

    pipeline = Pipeline(tiny_settings, engine_factory=lambda: Engine(RowsStubDetector(), BoxFillStubSegmenter()))
    client = create_app(tiny_settings, backend=EmbeddedBackend(tiny_settings, pipeline)).test_client()
    zero = {"no_label": 0, "threshold": 0, "not_in_outputs": 0, "area": 0, "per_label_cap": 0}
    assert dropped_metrics(client) == zero  # every reason is there from the start
    setup = client.post("/setup", json={"project": "1", "schema": METRICS_CONFIG, "extra_params": {
        "min_mask_area": 10, "max_per_label": 1, "outputs": ["rectangle"]}})
    assert setup.status_code == 200, setup.json
    body = {"tasks": [{"id": 1, "data": {"image": noise_uri(0, 64, 48)}}], "label_config": METRICS_CONFIG,
            "project": "1.1", "params": {"context": None}}
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.json
    [result] = answer.json["results"][0]["result"]
    assert result["value"]["rectanglelabels"] == ["cat"] and result["score"] == pytest.approx(0.9)
    once = {"no_label": 1, "threshold": 2, "area": 3, "per_label_cap": 4, "not_in_outputs": 5}
    assert dropped_metrics(client) == once
    client.post("/predict", json=body)
    assert dropped_metrics(client) == {reason: 2 * count for reason, count in once.items()}
