import pytest

from backend.ls.tasks import PromptLimits, RequestError, parse_predict_request, plan_tasks, split_prompt
from tests.conftest import recorded as recorded_exchange

LIMITS = PromptLimits(max_chars=200, max_phrases=4)


def recorded(name: str) -> dict:
    return recorded_exchange(name)["body"]


def test_batch_call_without_context_prompts_with_the_labels():
    request = parse_predict_request(recorded("predict_batch_request.json"), LIMITS)
    plans = plan_tasks(request, LIMITS)
    assert [p.task_id for p in plans] == [1, 2, 3]
    assert plans[0].image_url == "/data/upload/1/d984276e-shapes_landscape.png"
    assert all(p.phrases == ("circle", "square") for p in plans)


def test_interactive_prompt_is_found_by_from_name_not_position():
    body = recorded("predict_interactive_request.json")
    context = body["params"]["context"]
    decoy = {"id": "x", "from_name": "other", "to_name": "image", "type": "textarea", "value": {"text": ["decoy"]}}
    context["result"].insert(0, decoy)
    context["result"][1]["value"]["text"] = ["Red car, dog . "]
    plans = plan_tasks(parse_predict_request(body, LIMITS), LIMITS)
    assert plans[0].phrases == ("red car", "dog")


def test_empty_prompt_falls_back_to_labels():
    body = recorded("predict_interactive_request.json")
    body["params"]["context"]["result"][0]["value"]["text"] = ["  .  "]
    assert plan_tasks(parse_predict_request(body, LIMITS), LIMITS)[0].phrases == ("circle", "square")


def test_split_prompt_normalizes_and_deduplicates():
    assert split_prompt("Cat . red  car, cat,, DOG.", LIMITS) == ["cat", "red car", "dog"]


def test_a_question_mark_separates_phrases_as_it_does_inside_grounding_dino():
    """'?' is one of the model's phrase separators ([CLS], [SEP], '.', '?'), so it is one of ours."""
    assert split_prompt("cat? dog", LIMITS) == ["cat", "dog"]
    assert split_prompt("Is it a cat?? red car . dog?", LIMITS) == ["is it a cat", "red car", "dog"]
    assert split_prompt(" ? ", LIMITS) == []


@pytest.mark.parametrize("text, message", [("x" * 201, "at most 200"), ("a.b.c.d.e", "at most 4")])
def test_prompt_limits(text, message):
    with pytest.raises(RequestError, match=message):
        split_prompt(text, LIMITS)


def test_task_without_image_gets_a_reason_not_an_exception():
    body = recorded("predict_batch_request.json")
    body["tasks"][1]["data"] = {"text": "no image here"}
    plans = plan_tasks(parse_predict_request(body, LIMITS), LIMITS)
    assert plans[1].error == "task has no image URL in data.image" and plans[0].error is None


@pytest.mark.parametrize("body, message", [
    ([], "JSON object"),
    ({"tasks": [], "label_config": "<View/>"}, "non-empty list"),
    ({"tasks": [1], "label_config": "<View/>"}, "JSON object"),
    ({"tasks": [{"id": 1}]}, "empty"),
])
def test_malformed_requests(body, message):
    with pytest.raises(RequestError, match=message):
        parse_predict_request(body, LIMITS)
