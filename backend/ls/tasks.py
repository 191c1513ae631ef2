"""LS predict request → one plan per task: which image to load and which phrases to ground.

The prompt is the text of the config's ``<TextArea>`` found in ``context.result`` by ``from_name``.
Without one (the batch "Retrieve predictions" call, or an empty prompt) the prompt is the
config's labels and their ``predicted_values`` aliases. Phrases are separated by ``.`` or ``,``, and
by ``?``: Grounding DINO itself ends a phrase at ``.`` and ``?`` (its text self-attention stays
inside the tokens between two of them), so a prompt "cat? dog" is the two phrases it sees.

Bounds (checked before any image is fetched): at most ``max_tasks`` tasks per request (413), at most
``max_smart_prompts`` smart-tool clicks + boxes (413), and a smart-tool call is for one task (400).
An interactive call whose context holds neither prompt text nor smart-tool regions (LS 1.23 sends
``{"result": []}`` right after Submit) asks for nothing: see :func:`asks_for_nothing`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from backend.ls.options import PredictOptions
from backend.ls.labelconfig import LabelConfig, LabelConfigError, normalize_phrase, parse_label_config
from backend.ls.smartprompt import SmartPrompt, parse_smart_prompt

_SEPARATORS = re.compile(r"[.,?]")  # '.' and '?': the model's own phrase separators; ',' for people


class RequestError(ValueError):
    """The request cannot be served as sent; the message says what to fix (HTTP 400)."""


class RequestTooLarge(RequestError):
    """The request asks for more work than one call may (HTTP 413); the message names the setting."""


@dataclass(frozen=True)
class PromptLimits:
    """Per-request bounds (the name predates the task and smart-tool caps)."""

    max_chars: int = 2000
    max_phrases: int = 32
    max_tasks: int = 1000
    max_smart_prompts: int = 64


@dataclass(frozen=True)
class TaskPlan:
    """What to do for one task. ``error`` set means: answer an empty prediction with this reason."""

    task_id: Any
    image_url: str | None
    phrases: tuple[str, ...]
    error: str | None = None


@dataclass(frozen=True)
class PredictRequest:
    """A validated predict call. ``tasks`` are LS task dicts (``id``, ``data``); ``context`` is the
    interactive context LS sends (None for batch calls); ``prompt`` is a prompt given directly (bulk
    runs), used when the context holds no prompt text."""

    tasks: list[dict]
    config: LabelConfig
    context: dict | None
    prompt: str | None = None
    options: PredictOptions = PredictOptions()  # the project's options (extra_params, see backend.ls.options)
    bulk: bool = False  # a bulk run's chunk (no LS request waits on it: video tracking has no deadline)

    def prompt_text(self) -> str | None:
        """The prompt text: the context's TextArea text, else :attr:`prompt`, else None (labels)."""
        text = prompt_text(self.context, self.config)
        if text is None and self.prompt and self.prompt.strip():
            return self.prompt
        return text


def split_prompt(text: str, limits: PromptLimits) -> list[str]:
    """'cat . Red car, dog? bird' → ['cat', 'red car', 'dog', 'bird'] (normalized, de-duplicated, in order)."""
    if len(text) > limits.max_chars:
        raise RequestError(f"the prompt has {len(text)} characters; shorten it to at most {limits.max_chars}")
    phrases = list(dict.fromkeys(p for p in (normalize_phrase(s) for s in _SEPARATORS.split(text)) if p))
    if len(phrases) > limits.max_phrases:
        raise RequestError(f"the prompt has {len(phrases)} phrases; use at most {limits.max_phrases}")
    return phrases


def prompt_text(context: dict | None, config: LabelConfig) -> str | None:
    """The TextArea text in ``context.result`` whose ``from_name`` is the config's prompt tag."""
    if not context or not config.prompt_name:
        return None
    results = context.get("result")
    if not isinstance(results, list):
        return None
    texts = []
    for item in results:
        if isinstance(item, dict) and item.get("from_name") == config.prompt_name:
            value = item.get("value") or {}
            text = value.get("text") if isinstance(value, dict) else None
            if isinstance(text, str):
                text = [text]
            if isinstance(text, list):
                texts.extend(t for t in text if isinstance(t, str))
    return " . ".join(texts) if texts else None


def parse_predict_request(body: Any, limits: PromptLimits) -> PredictRequest:
    """Validate a ``/predict`` body. Raises :class:`RequestError` with what to fix."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with 'tasks' and 'label_config'")
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise RequestError("'tasks' must be a non-empty list of Label Studio tasks")
    if len(tasks) > limits.max_tasks:
        raise RequestTooLarge(f"the request has {len(tasks)} tasks; send at most {limits.max_tasks} per call "
                              "(MAX_TASKS_PER_REQUEST), or pre-label the project with POST /prelabel")
    if not all(isinstance(task, dict) for task in tasks):
        raise RequestError("every item of 'tasks' must be a JSON object (a Label Studio task)")
    try:
        config = parse_label_config(body.get("label_config") or "")
    except LabelConfigError as exc:
        raise RequestError(str(exc)) from None
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    context = params.get("context") if isinstance(params.get("context"), dict) else None
    if context is None and isinstance(body.get("context"), dict):
        context = body["context"]  # label-studio-ml 2.x also accepts a top-level context
    request = PredictRequest(tasks=tasks, config=config, context=context)
    check_smart_prompt(request, parse_smart_prompt(context, config), limits)
    return request


def check_smart_prompt(request: PredictRequest, smart: SmartPrompt, limits: PromptLimits) -> None:
    """A smart-tool call is one annotator on one task, with a bounded number of clicks and boxes."""
    if not smart:
        return
    count = len(smart.clicks) + len(smart.boxes)
    if count > limits.max_smart_prompts:
        raise RequestTooLarge(f"the context has {count} smart-tool clicks and boxes; use at most "
                              f"{limits.max_smart_prompts} (MAX_SMART_PROMPTS)")
    if len(request.tasks) != 1:
        raise RequestError(f"a smart-tool context (clicks or boxes) is for one task, got {len(request.tasks)}")


def asks_for_nothing(request: PredictRequest) -> bool:
    """True for an interactive call (a context is present) with no prompt text and no smart-tool
    regions (for a video project: no videorectangle track): LS 1.23 sends one with
    ``{"result": []}`` right after Submit. It gets empty predictions
    at once. No context at all (LS's batch and task-open calls) is not this: labels are the prompt."""
    if not isinstance(request.context, dict):
        return False
    if request.prompt_text() is not None:
        return False
    if request.config.is_video:  # a label click on a video box sends its tracks
        results = request.context.get("result")
        return not any(isinstance(item, dict) and item.get("type") == "videorectangle"
                       for item in (results if isinstance(results, list) else ()))
    return not parse_smart_prompt(request.context, request.config)


def plan_tasks(request: PredictRequest, limits: PromptLimits) -> list[TaskPlan]:
    """One plan per task, in task order. The prompt is shared: LS sends one context per call."""
    text = request.prompt_text()
    phrases = split_prompt(text, limits) if text else []
    phrases = tuple(phrases or request.config.default_phrases())
    plans = []
    key = request.config.image_value_key
    for task in request.tasks:
        data = task.get("data")
        url = data.get(key) if isinstance(data, dict) else None
        error = None if isinstance(url, str) and url.strip() else f"task has no image URL in data.{key}"
        plans.append(TaskPlan(task_id=task.get("id"), image_url=url if error is None else None,
                              phrases=phrases, error=error))
    return plans
