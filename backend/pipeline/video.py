"""Video tasks through the stages: task → video bytes → decoded frames → tracker → videorectangles.

A project whose label config is a video one (``<Video>`` + ``<VideoRectangle>`` + ``<Labels>``,
:attr:`LabelConfig.video`) comes here from :class:`~backend.pipeline.predict.Pipeline` for every
call: "Retrieve predictions" and opening a task (no context: the labels are the prompt), a
TextArea prompt (text → tracks), a label click on an annotator's box (the context's manual tracks
are followed, the others answered untouched), and bulk runs.

The video is fetched like an image (:meth:`ImageLoader.fetch`: LS credentials, SSRF guard, cloud
presign, deadlines) with MAX_VIDEO_MB as its size limit, opened with PyAV
(:class:`~backend.images.video.VideoSource`: MAX_VIDEO_FRAMES, corrupt files are a
:class:`VideoError`), and tracked by :mod:`backend.pipeline.videotrack` on the SAM 2.1 video
model (TRACKER_MODEL, loaded on first use) with the image engine's detector; with ENGINE=sam3 a
text prompt (or the labels) is tracked by SAM 3's own video model instead
(:mod:`backend.pipeline.videotrack_sam3`, SAM3_MODEL, loaded on first use). A /predict call
stops tracking at VIDEO_DEADLINE and answers what it has (logged); bulk runs have no deadline.
Each task fails alone: an empty prediction with its reason logged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from backend.errors import ImageError, ModelLoadError
from backend.images.video import VideoSource
from backend.ls.selection import select_detections
from backend.ls.tasks import PredictRequest, split_prompt
from backend.ls.videocontext import parse_context_tracks
from backend.ls.videoregions import build_video_prediction
from backend.ls.regions import empty_prediction
from backend.pipeline.loadlock import MODEL_LOADS
from backend.pipeline.outcome import TaskOutcome
from backend.pipeline.videotrack import Deadline, RunResult, TrackParams, track_boxes, track_text
from backend.pipeline.videotrack_sam3 import track_text_sam3
from backend.settings import EngineKind
from backend.tracks import Track, VideoTracks


log = logging.getLogger(__name__)

#: An annotator's track with at most this many keyframes is tracked; longer ones are their own work.
MAX_MANUAL_KEYFRAMES = 20


class LoadOnce:
    """A model loaded on first use, by one thread; a load that fails with ModelLoadError is one
    state: :attr:`error` keeps it and every later :meth:`get` raises it again, without a retry."""

    def __init__(self, what: str, load: Callable[[], object]):
        self.what, self._load = what, load
        self.model = None
        self.error: ModelLoadError | None = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self.error is not None:
                raise self.error
            if self.model is None:
                try:
                    with MODEL_LOADS:  # from_pretrained is not thread-safe
                        self.model = self._load()
                except ModelLoadError as exc:
                    self.error = exc
                    log.error("%s cannot be loaded: %s", self.what, exc.reason)
                    raise
            return self.model


class VideoPipeline:
    """The video half of a :class:`Pipeline`: shares its settings, loader, metrics and detector;
    owns the tracker (loaded on first use, one load, a load failure is one state)."""

    def __init__(self, pipeline):
        """``pipeline``: the owning :class:`backend.pipeline.predict.Pipeline` (not imported here:
        it imports this module)."""
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self._tracker = LoadOnce("the video tracker", self._build_tracker)  # TRACKER_MODEL
        self._sam3_video = LoadOnce("SAM 3's video model", self._build_sam3_video)  # ENGINE=sam3: text prompts
        # No lock around tracking runs: each has its own session (the models hold no per-video
        # state), so an annotator's label click is not queued behind a bulk run's long video.

    @property
    def load_error(self) -> ModelLoadError | None:
        """Why TRACKER_MODEL cannot be loaded (once tried), else None."""
        return self._tracker.error

    @property
    def sam3_load_error(self) -> ModelLoadError | None:
        """Why SAM3_MODEL's video model cannot be loaded (once tried), else None."""
        return self._sam3_video.error

    def tracker(self):
        """The SAM 2.1 video model (TRACKER_MODEL), loaded on first use."""
        return self._tracker.get()

    def sam3_video(self):
        """SAM 3's video model (SAM3_MODEL, ENGINE=sam3), loaded on first use."""
        return self._sam3_video.get()

    def _build_tracker(self):
        from backend.engine.video import build_tracker  # torch only where models run

        return build_tracker(self.settings)

    def _build_sam3_video(self):
        from backend.engine.sam3_video import Sam3VideoTracker  # torch only where models run

        return Sam3VideoTracker.from_settings(self.settings)

    def params(self, fps: float) -> TrackParams:
        settings = self.settings
        return TrackParams(detect_every=settings.video_detect_every or max(1, round(fps)),
                           track_frames=settings.video_track_frames or max(1, round(10 * fps)),
                           match_iou=settings.video_match_iou, max_objects=settings.video_max_objects,
                           direction=settings.video_track_direction)

    def predict_outcomes(self, request: PredictRequest) -> list[TaskOutcome]:
        """One outcome per task, in task order (see the module docstring)."""
        deadline = Deadline(None if request.bulk else self.settings.video_deadline)
        context_tracks = parse_context_tracks(request.context, request.config)
        text = request.prompt_text()
        if request.context is not None and text is None and not context_tracks:
            log.info("interactive video call with no prompt text and no track: %d empty predictions",
                     len(request.tasks))
            return [TaskOutcome(empty_prediction(self.pipeline.model_version)) for _ in request.tasks]
        phrases = tuple(split_prompt(text, self.pipeline.limits) if text else ()) or \
            tuple(request.config.default_phrases())
        outcomes = []
        for task in request.tasks:
            if deadline.passed():
                outcomes.append(self._failed(task, f"not started: the call reached VIDEO_DEADLINE="
                                                   f"{self.settings.video_deadline:g} s on earlier tasks"))
                continue
            outcomes.append(self._task(task, request, phrases if text or not context_tracks else None,
                                       context_tracks, deadline))
        return outcomes

    def _task(self, task: dict, request: PredictRequest, phrases, context_tracks, deadline) -> TaskOutcome:
        config = request.config
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        url = data.get(config.image_value_key)
        if not isinstance(url, str) or not url.strip():
            return self._failed(task, f"task has no video URL in data.{config.image_value_key}")
        fps = config.video.fps(data)
        started = time.perf_counter()
        try:
            with self.pipeline.metrics.stage_seconds.labels("images").time():
                blob = self.pipeline.loader.fetch(url, task_id=task.get("id"),
                                                  max_bytes=int(self.settings.max_video_mb * 2**20),
                                                  setting="MAX_VIDEO_MB")
            source = VideoSource(blob, max_frames=self.settings.max_video_frames, fps=fps)
        except ImageError as exc:  # VideoError too: a corrupt or oversized file fails its task only
            return self._failed(task, exc.reason)
        try:
            tracks, frames = self.track_source(source, request, phrases, context_tracks, fps, deadline)
        except ImageError as exc:  # decoding broke mid-file
            return self._failed(task, exc.reason)
        except ModelLoadError:
            raise  # everyone's failure: /predict answers 503
        except Exception as exc:  # noqa: BLE001 - one video the models cannot take fails only its task
            log.warning("task %s: tracking failed", task.get("id"), exc_info=True)
            return self._failed(task, f"tracking failed ({type(exc).__name__})")
        finally:
            source.close()
        info = source.info
        prediction = build_video_prediction(tracks, config, self.pipeline.model_version,
                                            self.settings.video_keyframe_tolerance)
        if tracks.truncated:
            log.warning("task %s: %s", task.get("id"), tracks.truncated)
        log.info("task %s: video %dx%d, %d frames at %g fps: %d tracks over %d frames in %.1f s", task.get("id"),
                 info.width, info.height, source.frames_count, fps, len(prediction["result"]), frames,
                 time.perf_counter() - started)
        self.pipeline.metrics.tasks.labels("ok").inc()
        for region in prediction["result"]:
            self.pipeline.metrics.regions.labels(region["type"]).inc()
        return TaskOutcome(prediction)

    def track_source(self, source: VideoSource, request: PredictRequest, phrases: tuple[str, ...] | None,
                     context_tracks=(), fps: float = 24.0, deadline: Deadline = Deadline(None)
                     ) -> tuple[VideoTracks, int]:
        """Track one opened video: ``phrases`` (text → tracks) or, when None, the context's tracks.
        Returns the tracks (pixels of the decoded frame) and how many frames were tracked."""
        with self.pipeline.metrics.stage_seconds.labels("engine").time():
            run = self._run(source, request, phrases, context_tracks, fps, deadline)
        info = source.info
        return VideoTracks(info.width, info.height, fps, info.duration, source.frames_count, run.tracks,
                           run.truncated), run.frames

    def _run(self, source, request: PredictRequest, phrases, context_tracks, fps, deadline) -> RunResult:
        params = self.params(fps)
        if phrases is not None and self.settings.engine is EngineKind.SAM3:  # SAM 3 detects and tracks
            return track_text_sam3(source, self.sam3_video(), phrases, request.config.map_phrase, params, deadline)
        tracker = self.tracker()
        if phrases is not None:  # a text prompt, or the labels when nothing else was asked
            engine = self.pipeline.engine()
            thresholds = self.pipeline.detect_thresholds(request)

            def detect(image):
                return engine.detect([image], [phrases], None if thresholds is None else [thresholds])[0]

            def select(result):
                return select_detections(result, request.config, request.options, self.pipeline.select_defaults).kept

            return track_text(source, tracker, detect, select, params, deadline)
        chosen = [t for t in context_tracks if t.needs_tracking(MAX_MANUAL_KEYFRAMES)]
        others = [t for t in context_tracks if not t.needs_tracking(MAX_MANUAL_KEYFRAMES)]
        fallback = request.config.labels[0]
        run = track_boxes(source, tracker, chosen, [t.label or fallback for t in chosen], params, deadline) \
            if chosen else RunResult((), 0)
        untouched = tuple(Track(t.track_id, t.label or fallback, 1.0, (), t.keyframes) for t in others)
        return RunResult(run.tracks + untouched, run.frames, run.truncated)

    def _failed(self, task: dict, reason: str) -> TaskOutcome:
        self.pipeline.metrics.tasks.labels("image_error").inc()
        log.warning("task %s: empty prediction: %s", task.get("id"), reason)
        return TaskOutcome(empty_prediction(self.pipeline.model_version), reason)
