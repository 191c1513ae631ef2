"""End-to-end per engine and model family: a real Label Studio 1.23 and the backend on tiny
random-weight checkpoints of each family (built by ``make-tiny-models --family``), loaded through
the same settings a user sets. The default pair (Grounding DINO + SAM) has its own, longer e2e
module (tests/test_e2e_label_studio.py); here each other family gets the annotator's three calls:
Data Manager "Retrieve predictions", an interactive text prompt, and a smart-tool click.
"""

from __future__ import annotations

import pytest

from tests.test_e2e_label_studio import (  # noqa: F401 - ``images`` and ``pat`` are fixtures
    IMAGE_SIZES, SMART_CONFIG, check_result, check_stored_predictions, connect, images, logs_on_failure)

pytestmark = pytest.mark.e2e

#: engine id → (family builds it needs, env naming them)
ENGINES = {
    "mm-grounding-dino+sam-hq": (("mm-grounding-dino", "sam-hq"),
                                 lambda d: {"GROUNDING_DINO_MODEL": d["mm-grounding-dino"], "SAM_MODEL": d["sam-hq"]}),
    "grounding-dino+sam2": (("sam2",), lambda d: {"SAM_MODEL": d["sam2"]}),
    "sam3": (("sam3",), lambda d: {"ENGINE": "sam3", "SAM3_MODEL": d["sam3"]}),
}
FAMILY_WORDS = {"mm-grounding-dino+sam-hq": ("mm", "hq"), "grounding-dino+sam2": ("sam2",), "sam3": ("sam3",)}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_in_label_studio(engine, label_studio, ls, images, start_backend, tiny_family):
    families, env_of = ENGINES[engine]
    env = env_of({family: str(tiny_family(family)) for family in families})
    project_id = ls.create_project(f"e2e engine {engine}", SMART_CONFIG)
    names = ["landscape", "portrait"]
    task_ids = ls.import_images(project_id, [images[n] for n in names])
    task_sizes = {tid: IMAGE_SIZES[n] for tid, n in zip(task_ids, names)}
    backend = start_backend(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.legacy_token, **env)
    with logs_on_failure(label_studio, backend):
        ml_id = connect(ls, project_id, backend, f"engine {engine}")

        # 1. Retrieve predictions: one batched /predict, regions with the label names as the prompt.
        ls.retrieve_predictions(project_id)
        check_stored_predictions(ls, task_sizes, f"retrieve ({engine})")
        version = ls.predictions(task_ids[0])[0]["model_version"]
        assert all(word in version for word in FAMILY_WORDS[engine]), f"model_version {version!r} hides the family"

        # 2. An interactive text prompt: "dog" maps to the label dog.
        context = {"result": [{"id": "p1", "from_name": "prompt", "to_name": "image", "type": "textarea",
                               "value": {"text": ["dog"]}, "origin": "manual"}]}
        answer = ls.interactive_annotating(ml_id, task_ids[0], context)
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), str(answer)[:2000]
        width, height = task_sizes[task_ids[0]]
        check_result(answer["data"]["result"], width, height, {"dog"}, f"prompt ({engine})")

        # 3. A smart keypoint click on the other task: one brush mask + its box, with the click's label.
        width, height = task_sizes[task_ids[1]]
        click = {"id": "k1", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                 "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": True,
                 "value": {"x": 35.0, "y": 40.0, "width": 0.6, "keypointlabels": ["cat"]}}
        answer = ls.interactive_annotating(ml_id, task_ids[1], {"result": [click]})
        assert not answer.get("errors") and isinstance(answer.get("data"), dict), str(answer)[:2000]
        counts = check_result(answer["data"]["result"], width, height, {"cat"}, f"smart click ({engine})")
        assert counts[("brushlabels", "cat")] == 1 and counts[("rectanglelabels", "cat")] == 1
