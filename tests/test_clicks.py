"""A second click on an image whose SAM embedding is cached does not decode the image again (the
frame cache gives its size), and answers exactly what a fresh process answers."""

import base64
import io

import pytest
from PIL import Image

import backend.images.decode as decode_module
import backend.images.fetch as fetch_module
from backend.images.frames import FrameCache
from backend.pipeline.predict import Pipeline
from tests.test_protocol import png
from tests.test_refine import encoder_calls, keypoint, predict, text, uri


@pytest.fixture
def decodes(monkeypatch):
    """Every full decode of a task image (the real decoder, counted): the loader's, and a deferred
    image's when something reads its pixels."""
    calls = []
    real = decode_module.decode_image

    def counted(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(fetch_module, "decode_image", counted)
    monkeypatch.setattr(decode_module, "decode_image", counted)
    return calls


def rotated_jpeg_uri(width: int, height: int, orientation: int) -> str:
    """A JPEG stored ``width x height`` whose EXIF orientation makes browsers (and LS) show it turned."""
    image = Image.open(io.BytesIO(png(width, height))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_second_click_skips_decoding_and_matches_a_fresh_process(tiny_settings, decodes):
    image = rotated_jpeg_uri(64, 40, orientation=6)  # shown 40 x 64
    warm = Pipeline(tiny_settings)
    encoder = encoder_calls(warm)
    predict(warm, image, keypoint(30, 30))
    assert len(decodes) == 1 and len(encoder) == 1
    second = predict(warm, image, keypoint(60, 70))
    assert len(decodes) == 1, "the second click decoded the image again"
    assert len(encoder) == 1
    fresh = predict(Pipeline(tiny_settings), image, keypoint(60, 70))  # decodes, encodes: the reference
    assert len(decodes) == 2
    assert second["result"], "the click gave no region: the comparison below would be vacuous"
    assert [r["value"] for r in second["result"]] == [r["value"] for r in fresh["result"]]
    sizes = {(r["original_width"], r["original_height"]) for r in second["result"]}
    assert sizes == {(40, 64)}  # the EXIF-transposed frame, as LS displays it


def test_known_bytes_whose_embedding_was_evicted_are_decoded_again(tiny_settings, decodes):
    from dataclasses import replace

    one_embedding = 32 * 16 * 16 * 4  # tiny SAM: (1, 32, 16, 16) float32
    pipeline = Pipeline(replace(tiny_settings, embedding_cache_mb=1.5 * one_embedding / 2**20))
    first, other = uri(64, 48), uri(48, 64)
    before = predict(pipeline, first, keypoint(50, 50))
    predict(pipeline, other, keypoint(50, 50))  # evicts the first embedding; its frame stays known
    again = predict(pipeline, first, keypoint(50, 50))
    assert len(decodes) == 3  # the encoder needed the pixels again
    assert again["result"] and [r["value"] for r in again["result"]] == [r["value"] for r in before["result"]]


def test_text_with_clicks_still_decodes_for_the_detector(tiny_settings, decodes):
    pipeline = Pipeline(tiny_settings)
    image = uri(64, 48)
    predict(pipeline, image, keypoint(50, 50))
    predict(pipeline, image, text("cat"), keypoint(30, 30))
    assert len(decodes) == 2


def test_frame_cache_is_bounded_and_least_recently_used_goes_first():
    frames = FrameCache(max_entries=2)
    frames.put("a", (1, 2))
    frames.put("b", (3, 4))
    assert frames.get("a") == (1, 2)  # a is now the most recent
    frames.put("c", (5, 6))
    assert len(frames) == 2 and frames.get("b") is None and frames.get("a") == (1, 2)
    off = FrameCache(max_entries=0)
    off.put("a", (1, 2))
    assert off.get("a") is None
    with pytest.raises(ValueError, match="max_entries"):
        FrameCache(max_entries=-1)


class ListedTasks:
    """The one LS call pre-warming makes, answered from a list (the real call is tested against LS in
    tests/test_dm_order.py and end to end in tests/test_e2e_prewarm.py): tasks after ``after`` in id
    order, ``count`` at most."""

    def __init__(self, tasks):
        self.tasks, self.calls = tasks, []

    def next_tasks(self, project, after, count):
        from backend.ls.client import TaskRef

        self.calls.append((project, after, count))
        return [TaskRef(id=i, data=d) for i, d in self.tasks if after is None or i > after][:count]


def test_prewarming_stays_within_half_the_embedding_cache_and_skips_cached_images(tiny_settings):
    from dataclasses import replace

    from backend.ls.labelconfig import parse_label_config
    from backend.pipeline.prewarm import Prewarmer, WarmRequest
    from tests.test_refine import CONFIG

    one_embedding = 32 * 16 * 16 * 4  # tiny SAM: (1, 32, 16, 16) float32
    pipeline = Pipeline(replace(tiny_settings, embedding_cache_mb=5 * one_embedding / 2**20))
    api = ListedTasks([(n, {"image": uri(40 + n, 30 + n)}) for n in range(1, 6)])
    prewarmer = Prewarmer(pipeline, api_factory=lambda: api)
    config = parse_label_config(CONFIG)
    assert prewarmer.warm(WarmRequest(project=7, after=1, count=4, config=config)) == 2  # 2.5 fit in half
    assert api.calls == [(7, 1, 4)]
    assert pipeline.metrics.prewarmed._value.get() == 2
    encoder = encoder_calls(pipeline)
    predict(pipeline, uri(42, 32), keypoint(50, 50))  # task 2's image: pre-warmed, so no encoder call
    assert encoder == []
    assert prewarmer.warm(WarmRequest(project=7, after=1, count=2, config=config)) == 0  # both cached
