"""SAM 2.1 video tracking: objects prompted on a frame, followed frame by frame (transformers'
``Sam2VideoModel``).

transformers' own way keeps a whole video in one ``Sam2VideoInferenceSession``: every frame,
preprocessed (12.6 MB at 1024² in fp32), and every object's outputs on every frame, never
dropped: ~19 GB for 3,000 frames in bf16. :class:`TrackingSession` streams instead. Frames go in
one at a time; every ``chunk`` frames everything the model can no longer read is dropped: frames
and non-conditioning outputs older than the model's memory window (``max(num_maskmem,
max_object_pointers_in_encoder)`` frames, 16 for SAM 2.1). What the model reads for the next frame
(the memory bank of the last 7 frames, the object pointers of the last 16, every prompted
frame) is carried into the next chunk, so a chunk seam changes nothing: the masks equal the
whole-clip session's (tests/test_tracker.py). Memory stays flat in the video's length.

Frames enter as ``(H, W, 3)`` uint8 RGB arrays of the decoded video (the frame every box and mask
here is in); the model sees them stretched to its ``(S, S)`` input like SAM 2's image mode
(:mod:`backend.engine.sam2`). Prompts are XYXY pixel boxes; outputs are
:class:`FrameObjects`: per object its :class:`CompactMask` at full frame size, its low-resolution
mask (for IoU matching) and its visibility score. Object ids are the caller's ints.

Backward tracking is a second session fed with the frames in reverse order: SAM 2's reverse mode
mirrors the frame offsets it reads memory at, so a reversed stream is the same computation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Sam2VideoModel
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

from backend.engine.masks import MaskJob, upsample_batch, upsample_masks
from backend.engine.preprocess import Normalizer, to_canvas
from backend.engine.sam2 import read_processor_config
from backend.results import CompactMask

log = logging.getLogger(__name__)

#: Frames between two prunings of a session's state (memory is bounded by chunk + window frames).
DEFAULT_CHUNK = 32


@dataclass(frozen=True)
class FrameObjects:
    """The tracked objects on one frame, in the order of ``ids``.

    masks:  full-frame masks (empty where the object is not visible).
    low:    (N, s, s) bool on the model's device: the model's low-resolution masks (s = S/4), for
            mask IoU between tracked objects and new detections.
    scores: (N,) float32 in [0, 1]: sigmoid of the model's object score (> 0.5: visible).
    """

    frame: int
    ids: tuple[int, ...]
    masks: tuple[CompactMask, ...]
    low: torch.Tensor
    scores: np.ndarray


class VideoTracker:
    """A loaded ``Sam2VideoModel`` (TRACKER_MODEL: hub id or directory of a SAM 2.1 checkpoint).

    Stateless between videos: each video gets its own :class:`TrackingSession` (:meth:`session`);
    the model keeps no per-video state, so sessions may run in different threads. A session
    itself is not thread-safe.
    """

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype, chunk: int = DEFAULT_CHUNK):
        self.device, self.dtype, self.chunk = device, dtype, chunk
        processor = read_processor_config(source)
        self.square = int(processor.size["height"])
        self.resample = processor.resample
        self.normalize = Normalizer(processor)
        self.model = Sam2VideoModel.from_pretrained(source, dtype=dtype).to(device).eval()
        config = self.model.config
        #: Frames behind the current one that the model reads (memory bank and object pointers).
        self.window = max(int(config.num_maskmem), int(config.max_object_pointers_in_encoder))

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB → (3, S, S) normalized pixels on the device, in the model's dtype."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a video frame must be (height, width, 3) uint8 RGB, got {image.shape} {image.dtype}")
        canvas = to_canvas(Image.fromarray(image), (self.square, self.square), (self.square, self.square),
                           self.resample)
        pixels, _ = self.normalize([canvas], self.device, self.dtype)
        return pixels[0]

    def session(self, width: int, height: int) -> "TrackingSession":
        return TrackingSession(self, width, height)


class TrackingSession:
    """One video's (or one direction's) streaming tracking state. Frames are added in order with
    :meth:`track` (one model step for every object); prompts with :meth:`prompt_boxes` before the
    :meth:`track` of their frame."""

    def __init__(self, tracker: VideoTracker, width: int, height: int):
        self.tracker, self.width, self.height = tracker, width, height
        device, dtype = tracker.device, tracker.dtype
        self.state = Sam2VideoInferenceSession(video_height=height, video_width=width, inference_device=device,
                                               inference_state_device=device, video_storage_device=device,
                                               dtype=dtype)
        self._index: dict[int, int] = {}  # caller's frame number → session frame index
        self._pixels: dict[int, torch.Tensor] = {}  # session index → pixels (within the window)
        self._since_prune = 0

    @property
    def object_ids(self) -> tuple[int, ...]:
        return tuple(self.state.obj_ids)

    def _session_index(self, frame: int) -> int:
        index = self._index.get(frame)
        if index is None:
            index = len(self._index)
            self._index[frame] = index
        return index

    def prompt_boxes(self, frame: int, ids: Sequence[int], boxes: np.ndarray) -> None:
        """Prompt objects ``ids`` on ``frame`` with (N, 4) XYXY pixel boxes (new ids start tracks)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(boxes) != len(ids):
            raise ValueError(f"{len(ids)} object ids but {len(boxes)} boxes")
        index = self._session_index(frame)
        scale = np.array([self.tracker.square / self.width, self.tracker.square / self.height] * 2)
        for obj_id, box in zip(ids, boxes):
            obj_idx = self.state.obj_id_to_idx(int(obj_id))
            corners = torch.tensor((box * scale).reshape(1, 1, 2, 2), dtype=torch.float32)
            self.state.add_point_inputs(obj_idx, index, {"point_coords": corners,
                                                         "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)})
            self.state.remove_mask_inputs(obj_idx, index)
        self._mark_new(ids)

    def _mark_new(self, ids: Sequence[int]) -> None:
        pending = list(self.state.obj_with_new_inputs)
        self.state.obj_with_new_inputs = pending + [int(i) for i in ids if int(i) not in pending]

    def add_frame(self, frame: int, image: np.ndarray) -> None:
        """Give the session ``frame``'s pixels ((H, W, 3) uint8 RGB) without running the model.
        Pixels older than the memory window go at once: frames with no object to track (before
        the first detection) must not pile up either."""
        index = self._session_index(frame)
        self._pixels[index] = self.tracker.pixels(image)
        for old in [i for i in self._pixels if i < index - self.tracker.window - self.tracker.chunk]:
            del self._pixels[old]

    @torch.inference_mode()
    def track(self, frame: int, image: np.ndarray | None = None) -> FrameObjects:
        """Run the model on ``frame`` (its pixels ``image``, (H, W, 3) uint8; None: given before
        with :meth:`add_frame` or an earlier call, e.g. to re-run it after new prompts) for every
        object."""
        index = self._session_index(frame)
        if image is not None:
            self.add_frame(frame, image)
        if index not in self._pixels:
            raise ValueError(f"frame {frame} has no pixels in this session: pass its image")
        if not self.state.obj_ids:
            raise ValueError("no object to track: prompt one first")
        # Streaming (a frame passed): the model reads at most max_object_pointers_in_encoder
        # pointers whatever the session holds, as it does on a whole clip of that many frames.
        output = self.tracker.model(inference_session=self.state, frame_idx=index, frame=self._pixels[index])
        logits = output.pred_masks[:, 0]  # (N, s, s)
        scores = torch.sigmoid(output.object_score_logits.float().reshape(-1))
        # masks and scores reach the host in one copy, one wait per frame
        (masks,), (scores,) = upsample_batch([MaskJob(logits, None, None, (self.height, self.width))],
                                             extras=[scores]).result()
        self._since_prune += 1
        if self._since_prune >= self.tracker.chunk:
            self.prune(index)
        return FrameObjects(frame, tuple(output.object_ids), tuple(masks), logits > 0, scores)

    @torch.inference_mode()
    def segment_boxes(self, frame: int, boxes: np.ndarray) -> tuple[list[CompactMask], torch.Tensor]:
        """Masks of (N, 4) XYXY pixel boxes on ``frame`` (already given to :meth:`track`), without
        touching this session's objects: a one-frame scratch session that shares the frame's
        image features. Returns full-frame masks and (N, s, s) low-resolution bool masks."""
        index = self._index[frame]
        scratch = TrackingSession(self.tracker, self.width, self.height)
        scratch._index[frame] = 0
        scratch._pixels[0] = self._pixels[index]
        features = self.state.cache.get_vision_features(index)
        if features is not None:
            scratch.state.cache.cache_vision_features(0, features)
        scratch.prompt_boxes(frame, list(range(len(boxes))), boxes)
        output = self.tracker.model(inference_session=scratch.state, frame_idx=0, frame=scratch._pixels[0],
                                    run_mem_encoder=False)
        logits = output.pred_masks[:, 0]
        return upsample_masks(logits, None, None, (self.height, self.width)), logits > 0

    def prune(self, current: int) -> None:
        """Drop the frames and non-conditioning outputs the model will not read again after
        session frame ``current`` (older than the memory window). Prompted frames stay."""
        oldest = current - self.tracker.window
        for index in [i for i in self._pixels if i < oldest]:
            del self._pixels[index]
        frames = self.state.processed_frames or {}
        for index in [i for i in frames if i < oldest]:
            del frames[index]
        for per_obj in self.state.output_dict_per_obj.values():
            outputs = per_obj["non_cond_frame_outputs"]
            for index in [i for i in outputs if i < oldest]:
                del outputs[index]
        for tracked in self.state.frames_tracked_per_obj.values():
            for index in [i for i in tracked if i < oldest]:
                del tracked[index]
        self._since_prune = 0

    def held_frames(self) -> int:
        """Frames whose pixels this session holds now (bounded by chunk + window)."""
        return len(self._pixels)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, s, s) × (M, s, s) bool → (N, M) float IoU (0 where both are empty)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
