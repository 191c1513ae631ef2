"""LS predict request → one plan per task: which image to load and which phrases to ground.

The prompt is the text of the config's ``<TextArea>`` found in ``context.result`` by ``from_name``.
Without one (the batch "Retrieve predictions" call, or an empty prompt) the prompt is the
config's labels and their ``predicted_values`` aliases. Phrases are separated by ``.`` or ``,``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from backend.labelconfig import LabelConfig, LabelConfigError, normalize_phrase, parse_label_config

_SEPARATORS = re.compile(r"[.,]")


class RequestError(ValueError):
    """The request cannot be served as sent; the message says what to fix (HTTP 400)."""


@dataclass(frozen=True)
class PromptLimits:
    max_chars: int = 2000
    max_phrases: int = 32


@dataclass(frozen=True)
class TaskPlan:
    """What to do for one task. ``error`` set means: answer an empty prediction with this reason."""

    task_id: Any
    image_url: str | None
    phrases: tuple[str, ...]
    error: str | None = None


@dataclass(frozen=True)
class PredictRequest:
    tasks: list[dict]
    config: LabelConfig
    context: dict | None
    project: str | None


def split_prompt(text: str, limits: PromptLimits) -> list[str]:
    """'cat . Red car, dog' → ['cat', 'red car', 'dog'] (normalized, de-duplicated, in order)."""
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
    project = body.get("project")
    return PredictRequest(tasks=tasks, config=config, context=context,
                          project=str(project) if project is not None else None)


def plan_tasks(request: PredictRequest, limits: PromptLimits) -> list[TaskPlan]:
    """One plan per task, in task order. The prompt is shared: LS sends one context per call."""
    text = prompt_text(request.context, request.config)
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
