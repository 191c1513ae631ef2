"""The Label Studio-facing model class, in the shape of a label-studio-ml 2.x backend.

``GroundedSAM`` is cheap to create: the heavy parts (models, downloader, metrics) live in the
shared :class:`backend.pipeline.predict.Pipeline`, so the web layer makes one per request, like
label-studio-ml does, without reloading anything.
"""

from __future__ import annotations

from backend.ls.labelconfig import parse_label_config
from backend.pipeline.predict import Pipeline
from backend.settings import Settings
from backend.ls.tasks import PredictRequest


class GroundedSAM:
    """Text prompt → Grounding DINO boxes → SAM masks → rectanglelabels + brushlabels."""

    def __init__(self, label_config: str, pipeline: Pipeline | None = None, project: str | None = None):
        self.label_config = label_config
        self.project = project
        self.pipeline = pipeline or Pipeline(Settings.from_env())

    @property
    def model_version(self) -> str:
        return self.pipeline.model_version

    def setup(self) -> dict:
        """Validate the label config (raises LabelConfigError) and report the model version.

        Loads no model: LS gives /setup a few seconds.
        """
        parse_label_config(self.label_config)
        return {"model_version": self.model_version}

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One prediction dict ({result, score, model_version}) per task, in task order."""
        request = PredictRequest(tasks=tasks, config=parse_label_config(self.label_config),
                                 context=context)
        return self.pipeline.predict(request)
