"""What a bulk run does and what it works on: :class:`PrelabelSpec` and :class:`BulkTask`.

Both travel inside RQ jobs, so both have a JSON form (``to_json`` / ``from_json``); everywhere
else in :mod:`backend.bulk` they are these dataclasses. Imports only :mod:`backend.ls.options` (the
run store and the chunk processing both import it, so neither has to import the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backend.ls.options import ENGINE_NAMES, PredictOptions
from backend.settings import EngineKind


@dataclass(frozen=True)
class PrelabelSpec:
    """What a run does: label ``project`` with ``model_version`` (``prompt`` None: the project's
    labels are the prompt; ``redo``: also tasks that already have a prediction of the version).
    ``label_config`` is the project's XML, read once when the run starts; ``options`` are the
    project's ``extra_params`` when the run started (they travel with every chunk job)."""

    project: int
    label_config: str
    prompt: str | None
    model_version: str
    redo: bool = False
    options: PredictOptions = PredictOptions()
    engine: str = EngineKind.GROUNDED_SAM.value  # whose workers label it (queue mode: its prelabel queue)

    def to_dict(self) -> dict:
        return {"project": self.project, "label_config": self.label_config, "prompt": self.prompt,
                "model_version": self.model_version, "redo": self.redo, "options": self.options.to_json(),
                "engine": self.engine}

    @classmethod
    def from_dict(cls, data: dict) -> "PrelabelSpec":
        prompt = data.get("prompt")
        return cls(project=int(data["project"]), label_config=str(data["label_config"]),
                   prompt=str(prompt) if prompt else None, model_version=str(data["model_version"]),
                   redo=bool(data.get("redo", False)),
                   options=PredictOptions.from_json(data.get("options")),  # re-validated: it crossed Redis
                   engine=_engine(data.get("engine")))


def _engine(value: Any) -> str:
    """A spec's engine read back from Redis (runs recorded before engines were named: the default)."""
    if value is None:
        return EngineKind.GROUNDED_SAM.value
    if value not in ENGINE_NAMES:
        raise ValueError(f"a run's engine is one of {', '.join(ENGINE_NAMES)}, not {value!r:.40}")
    return value


@dataclass(frozen=True)
class BulkTask:
    """One LS task of a run: its id and its ``data`` (what the pipeline reads the image URL from)."""

    id: int
    data: dict[str, Any]

    def to_json(self) -> dict:
        """The RQ job argument form: ``{"id": int, "data": {...}}``."""
        return {"id": self.id, "data": self.data}

    @classmethod
    def from_json(cls, item: Any) -> "BulkTask":
        """From a job argument (it crossed Redis): ``{"id": positive int, "data": object}``, else ValueError."""
        task_id, data = (item.get("id"), item.get("data") or {}) if isinstance(item, dict) else (None, None)
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 1 or not isinstance(data, dict):
            raise ValueError("a bulk task is {\"id\": a positive integer, \"data\": an object}")
        return cls(id=task_id, data=data)


__all__ = ["BulkTask", "PrelabelSpec"]
