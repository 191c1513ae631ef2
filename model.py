"""The Label Studio-facing model class, in the shape of a label-studio-ml 2.x backend.

``GroundedSAM`` is a thin adapter over :class:`backend.pipeline.predict.Pipeline`, which owns the
heavy parts (models, downloader, metrics): creating one per request reloads nothing. The HTTP
server does not need it (it talks to :mod:`backend.modes`); it is here for code that drives the
backend the label-studio-ml way, e.g. ``GroundedSAM(label_config).predict(tasks, context)``.
"""

from __future__ import annotations

from backend.ls.labelconfig import parse_label_config
from backend.ls.tasks import PredictRequest
from backend.pipeline.predict import Pipeline
from backend.settings import Settings


class GroundedSAM:
    """Text prompt → Grounding DINO boxes → SAM masks → rectanglelabels + brushlabels."""

    def __init__(self, label_config: str, pipeline: Pipeline | None = None):
        self.label_config = label_config
        self.pipeline = pipeline or Pipeline(Settings.from_env())

    @property
    def model_version(self) -> str:
        return self.pipeline.model_version

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One prediction dict ({result, score, model_version}) per task, in task order."""
        request = PredictRequest(tasks=tasks, config=parse_label_config(self.label_config), context=context)
        return self.predict_request(request)

    def predict_request(self, request: PredictRequest) -> list[dict]:
        """The same for a request that is already parsed and validated (no second parse)."""
        return self.pipeline.predict(request)
