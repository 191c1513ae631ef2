"""SAM 3's video model (ENGINE=sam3): text phrases → instances detected and tracked frame by frame
(transformers' ``Sam3VideoModel``, the ``sam3_video`` checkpoint SAM3_MODEL names).

Each frame the detector finds every instance of every phrase, the tracker (SAM-2-style memory)
carries the known ones, and the model's own rules match the two, start objects for new
detections, and drop duplicates and unconfirmed ones in their first ``hotstart_delay`` frames.
Object ids are the model's (ints from 0, never reused in a video); each object keeps the phrase
(prompt) that found it.

Streaming, with flat memory. transformers keeps a whole video in one session: every preprocessed
frame and every object's outputs on every frame (pixels, pred/high-res masks, memory features),
never dropped. :class:`Sam3VideoStream` takes frames one at a time and, after each, drops what
the model will not read again (:meth:`Sam3VideoStream.prune`):

- the frame's pixels (its vision features are cached for that frame only, as transformers does);
- each object's masks of the frame (read only while the frame runs);
- tracked (non-conditioning) outputs older than the window ``max(num_maskmem,
  max_object_pointers_in_encoder)`` (16 frames): the model reads memory 6 frames back and object
  pointers 15 back;
- conditioning outputs (an object's first frame, and frames re-conditioned on a confident
  detection, every 16th frame) older than the window and not among the ``max_cond_frame_num`` (4)
  latest: the memory attention picks those 4, but transformers 5.23 also reads the object
  pointer of *every* earlier conditioning frame, so that pointer (256 floats) is kept. This is the
  one thing that grows: ~1 KB per confidently tracked object every 16 frames;
- per-frame bookkeeping (tracker scores, suppressed ids, mask prompts, tracked-frame marks) of
  past frames, and the hotstart frame lists past the lengths the rules compare against.

The session reports the video's frame count (``total_frames``) as its length, as a whole-clip
session does (the tracker scales pointer offsets by ``min(length, 16)``), so streamed results
equal transformers' whole-clip ``propagate_in_video_iterator`` on the same frames
(``tests/test_sam3_video.py``), hotstart rules included: outputs come ``hotstart_delay`` frames
late (:meth:`Sam3VideoStream.push` returns the frames that are final; :meth:`finish` the rest).

Frames enter as ``(H, W, 3)`` uint8 RGB arrays of the decoded video, resized to the model's
``(S, S)`` square with PIL and normalised as :mod:`backend.engine.sam3` does for images (the
video processor needs torchvision). Masks and boxes leave in pixels of that frame; boxes are
XYXY with exclusive right/bottom (:meth:`CompactMask.box`). NMS and hole filling need a hub
kernel that offline hosts lack: :mod:`backend.engine.sam3_cvutils` stands in for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, Sam3VideoModel
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from backend.engine import sam3_cvutils
from backend.engine.device import configure_device, resolve_device, resolve_dtype
from backend.engine.families import load_error, require_family
from backend.engine.masks import DEFAULT_BUDGET_BYTES, binary_to_masks, chunk_size
from backend.engine.preprocess import Normalizer, to_canvas
from backend.engine.sam3 import image_processor_config
from backend.errors import ModelLoadError
from backend.results import CompactMask

__all__ = ["FrameInstances", "Sam3VideoTracker", "Sam3VideoStream", "instances"]

log = logging.getLogger(__name__)

#: Output keys of a finished frame that the model never reads again (the memory features and the
#: object pointer are what later frames read).
_SPENT_KEYS = ("pred_masks", "high_res_masks")


@dataclass(frozen=True)
class FrameInstances:
    """The objects on one frame, in the order of ``ids`` (ascending).

    frame:   the caller's frame number.
    ids:     the model's object ids.
    phrases: per object the phrase (prompt) that found it.
    scores:  (N,) float32: per object its detection score (sigmoid(query) x sigmoid(presence)
             when it was first found; transformers' ``postprocess_outputs`` "scores").
    masks:   per object its mask, full frame; empty where another object of its phrase with a
             higher tracker score claims every pixel (the model's non-overlap rule).
    """

    frame: int
    ids: tuple[int, ...]
    phrases: tuple[str, ...]
    scores: np.ndarray
    masks: tuple[CompactMask, ...]

    def boxes(self) -> list[np.ndarray | None]:
        """Per object its (4,) float32 XYXY pixel box, None for an empty mask."""
        return [mask.box() for mask in self.masks]


class UnsupportedCheckpoint(ValueError):
    """A checkpoint that loads but that transformers' video model cannot run."""


class _Session(Sam3VideoInferenceSession):
    """A streamed session that reports the video's length as a whole-clip session would."""

    def __init__(self, total_frames: int, **kwargs):
        super().__init__(**kwargs)
        self.total_frames = total_frames

    @property
    def num_frames(self) -> int:
        return self.total_frames


class Sam3VideoTracker:
    """A loaded ``Sam3VideoModel`` (SAM3_MODEL: a ``sam3_video`` checkpoint, hub id or directory).

    Stateless between videos: each video gets its own :class:`Sam3VideoStream` (:meth:`stream`).
    Not thread-safe: the caller (the pipeline's video half) runs one stream at a time.
    """

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        processor = image_processor_config(source)
        self.square = int(processor.size["height"])
        self.resample = processor.resample
        self.normalize = Normalizer(processor)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = Sam3VideoModel.from_pretrained(source, dtype=dtype).to(device).eval()
        self.text_length = self.model.config.detector_config.text_config.max_position_embeddings
        tracker = self.model.config.tracker_config
        width, memory = int(tracker.vision_config.fpn_hidden_size), int(tracker.memory_encoder_output_channels)
        if memory != 64 or width % 64 or width <= 64:  # transformers 5.23's memory attention (tiny_sam3_video)
            raise UnsupportedCheckpoint(f"its tracker is {width} wide with {memory}-channel memories, which "
                                        "transformers' video model cannot run (it needs 64-channel memories and a "
                                        "width that is a multiple of 64 above it)")
        #: Frames behind the current one whose outputs the model reads (memory bank, object pointers).
        self.window = max(int(tracker.num_maskmem), int(tracker.max_object_pointers_in_encoder))
        self.max_cond_frames = int(tracker.max_cond_frame_num)
        self.postprocessing = sam3_cvutils.install()

    @classmethod
    def from_settings(cls, settings) -> "Sam3VideoTracker":
        """Load SAM3_MODEL for video. Raises ModelLoadError (naming SAM3_MODEL and the fix)."""
        source = settings.sam3_model
        require_family("SAM3_MODEL", source, {"sam3_video": "sam3"})  # a bare sam3 one has no tracker
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        configure_device(device, settings.flush_denormals)
        log.info("loading SAM 3's video model on %s (%s): %s", device, dtype, source)
        try:
            return cls(source, device, dtype)
        except UnsupportedCheckpoint as exc:
            raise ModelLoadError("SAM3_MODEL", source, str(exc), "use a sam3_video checkpoint such as facebook/sam3 "
                                 "(a tiny one: make-tiny-models DIR --family sam3-video)") from exc
        except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear state
            raise load_error("SAM3_MODEL", source, exc) from exc

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB → (3, S, S) normalised pixels on the device, in the model's dtype."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a video frame must be (height, width, 3) uint8 RGB, got {image.shape} {image.dtype}")
        canvas = to_canvas(Image.fromarray(image), (self.square, self.square), (self.square, self.square),
                           self.resample)
        return self.normalize([canvas], self.device, self.dtype)[0][0]

    def stream(self, width: int, height: int, phrases: Sequence[str], total_frames: int) -> "Sam3VideoStream":
        """A stream over one video of ``total_frames`` frames of ``width`` x ``height`` pixels."""
        return Sam3VideoStream(self, width, height, phrases, total_frames)


class Sam3VideoStream:
    """One video's streaming state. :meth:`push` frames in order, then :meth:`finish`."""

    def __init__(self, tracker: Sam3VideoTracker, width: int, height: int, phrases: Sequence[str],
                 total_frames: int):
        phrases = [p for p in dict.fromkeys(phrases) if isinstance(p, str) and p.strip()]
        if not phrases:
            raise ValueError("SAM 3 video needs at least one non-empty phrase to look for")
        if not isinstance(total_frames, int) or total_frames < 1:
            raise ValueError(f"total_frames must be the video's frame count (an int >= 1), got {total_frames!r}")
        self.tracker, self.width, self.height = tracker, width, height
        device = tracker.device
        self.state = _Session(total_frames, video_height=height, video_width=width, inference_device=device,
                              inference_state_device=device, video_storage_device=device, dtype=tracker.dtype)
        for phrase in phrases:
            prompt_id = self.state.add_prompt(phrase)
            text = tracker.tokenizer(phrase, return_tensors="pt", padding="max_length", truncation=True,
                                     max_length=tracker.text_length)
            self.state.prompt_input_ids[prompt_id] = text.input_ids.to(device)
            self.state.prompt_attention_masks[prompt_id] = text.attention_mask.to(device)
        self._prompt_of: dict[int, int] = {}  # every object ever seen → its prompt id
        self._buffer: list[tuple[int, object]] = []  # (caller's frame, output) awaiting hotstart
        self._count = 0

    @torch.inference_mode()
    def push(self, frame: int, image: np.ndarray) -> list[FrameInstances]:
        """Run the model on the next frame (``image``: (H, W, 3) uint8 RGB of this stream's size);
        returns the frames whose instances are final now (``hotstart_delay`` frames behind)."""
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame {frame} is {image.shape[1]}x{image.shape[0]} pixels but the stream's video is "
                             f"{self.width}x{self.height}: give every frame in the decoded size")
        if self._count >= self.state.total_frames:
            raise ValueError(f"frame {frame} is past the {self.state.total_frames} frames the stream was opened for")
        index = self._count
        self._count += 1
        self.state.add_new_frame(self.tracker.pixels(image), index)
        output = self.tracker.model(inference_session=self.state, frame_idx=index)
        self.state.hotstart_removed_obj_ids.update(output.removed_obj_ids)
        for obj_id in output.obj_id_to_mask:
            self._prompt_of.setdefault(int(obj_id), self.state.obj_id_to_prompt_id[obj_id])
        self.prune(index)
        self._buffer.append((frame, output))
        delay = self.tracker.model.hotstart_delay
        ready = self._buffer[:1] if delay <= 0 or len(self._buffer) >= delay else []
        del self._buffer[:len(ready)]
        return [self._instances(f, out) for f, out in ready]

    def finish(self) -> list[FrameInstances]:
        """The frames still held back for the hotstart rules (the end of the video, or of the run)."""
        ready, self._buffer = self._buffer, []
        return [self._instances(f, out) for f, out in ready]

    def _instances(self, frame: int, output) -> FrameInstances:
        return instances(output, frame, (self.height, self.width), self._prompt_of, self.state.prompts,
                         self.state.hotstart_removed_obj_ids)

    def prune(self, index: int) -> None:
        """Drop what the model will not read after session frame ``index`` (module docstring)."""
        state, oldest = self.state, index - self.tracker.window
        state.processed_frames.pop(index, None)
        for outputs in state.output_dict_per_obj.values():
            cond, tracked = outputs["cond_frame_outputs"], outputs["non_cond_frame_outputs"]
            for store in (cond, tracked):
                for key in _SPENT_KEYS:
                    store.get(index, {}).pop(key, None)
            for f in [f for f in tracked if f < oldest]:
                del tracked[f]
            keep = self.tracker.max_cond_frames  # -1: the model attends to every conditioning frame
            latest = set(cond) if keep <= 0 else set(sorted(cond)[-keep:])
            for f in [f for f in cond if f < oldest and f not in latest and len(cond[f]) > 1]:
                cond[f] = {"object_pointer": cond[f]["object_pointer"]}
        for per_object in (state.frames_tracked_per_obj, state.mask_inputs_per_obj, state.point_inputs_per_obj):
            for frames in per_object.values():
                for f in [f for f in frames if f < index]:
                    del frames[f]
        for per_frame in (state.obj_id_to_tracker_score_frame_wise, state.suppressed_obj_ids):
            for f in [f for f in per_frame if f < index]:
                del per_frame[f]
        model = self.tracker.model  # the hotstart rules compare these lists' lengths with thresholds
        for lists, cap in ((state.unmatched_frame_inds, model.hotstart_unmatch_thresh),
                           (state.overlap_pair_to_frame_inds, model.hotstart_dup_thresh)):
            for frames in lists.values():
                del frames[:max(0, len(frames) - cap)]

    def held(self) -> dict[str, int]:
        """What the stream holds now, for tests and logs: frames' pixels, per object (max over
        objects) its tracked outputs, full conditioning outputs and pointer-only ones, and the
        per-frame entries and outputs waiting for the hotstart rules."""
        outputs = list(self.state.output_dict_per_obj.values())
        cond = [o["cond_frame_outputs"] for o in outputs]
        return {
            "frames": len(self.state.processed_frames or {}),
            "tracked_outputs": max((len(o["non_cond_frame_outputs"]) for o in outputs), default=0),
            "cond_outputs": max((sum(len(v) > 1 for v in c.values()) for c in cond), default=0),
            "pointer_only": max((sum(len(v) == 1 for v in c.values()) for c in cond), default=0),
            "frame_entries": max((len(f) for f in self.state.frames_tracked_per_obj.values()), default=0)
            + len(self.state.obj_id_to_tracker_score_frame_wise) + len(self.state.suppressed_obj_ids),
            "buffered": len(self._buffer),
        }


def instances(output, frame: int, size: tuple[int, int], prompt_of: Mapping[int, int], prompts: Mapping[int, str],
              hidden: set[int], *, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> FrameInstances:
    """A ``Sam3VideoSegmentationOutput`` → :class:`FrameInstances` in the (H, W) = ``size`` frame,
    as ``Sam3VideoProcessor.postprocess_outputs`` does (which needs torchvision): low-resolution
    logits resized bilinearly to the frame and thresholded at 0; objects with an empty mask,
    suppressed on the frame or in ``hidden`` (removed by the hotstart rules) left out; then within
    each phrase every pixel goes to the object with the highest tracker score there.
    ``prompt_of``: object id → prompt id; ``prompts``: prompt id → phrase."""
    height, width = size
    ids = sorted(int(i) for i in output.obj_id_to_mask)
    skip = set(hidden) | set(output.suppressed_obj_ids or ())
    if not ids:
        return FrameInstances(frame, (), (), np.zeros(0, np.float32), ())
    low = torch.cat([output.obj_id_to_mask[i] for i in ids])  # (N, h, w) logits
    step = chunk_size(height, width, None, budget_bytes)
    binary = torch.cat([F.interpolate(low[s:s + step, None].float(), (height, width), mode="bilinear",
                                      align_corners=False)[:, 0] > 0 for s in range(0, len(ids), step)])
    present = binary.flatten(1).any(dim=1).cpu().tolist()
    keep = [k for k, obj_id in enumerate(ids) if present[k] and obj_id not in skip]
    ids, binary = [ids[k] for k in keep], binary[keep]
    tracker_scores = [float(output.obj_id_to_tracker_score.get(i, 0.0)) for i in ids]
    groups: dict[int, list[int]] = {}
    for k, obj_id in enumerate(ids):
        groups.setdefault(prompt_of[obj_id], []).append(k)
    for members in groups.values():
        if len(members) > 1:
            _claim_pixels(binary, members, tracker_scores)
    scores = np.array([output.obj_id_to_score[i] for i in ids], np.float32)
    return FrameInstances(frame, tuple(ids), tuple(prompts[prompt_of[i]] for i in ids), scores,
                          tuple(binary_to_masks(binary)) if ids else ())


def _claim_pixels(binary: torch.Tensor, members: list[int], scores: list[float]) -> None:
    """In place: each pixel of ``binary`` (N, H, W) stays only in the member whose score is the
    highest among the members covering it (the first on ties), and only if that score is > 0
    (``_apply_object_wise_non_overlapping_constraints`` with background 0)."""
    first = members[0]
    best = torch.where(binary[first], scores[first], 0.0)
    owner = torch.full(binary.shape[1:], first, dtype=torch.long, device=binary.device)
    for k in members[1:]:  # argmax over "score where covered, else 0"; the first maximum wins
        value = torch.where(binary[k], scores[k], 0.0)
        better = value > best
        owner = torch.where(better, k, owner)
        best = torch.where(better, value, best)
    for k in members:
        binary[k] &= (owner == k) & (scores[k] > 0)
