"""The GPU stage: Grounding DINO turns phrases into boxes, SAM turns boxes into masks.

Owns every torch import of the backend: ``engine.py`` (:class:`~backend.engine.engine.Engine`:
detector + segmenter behind a lock; prepare, run, detect, refine, probe), ``detector``,
``segmenter``, ``masks`` (upsampling on the device), ``device`` (device, dtype, TF32,
BATCH_SIZE=auto), ``compiling`` (COMPILE=1: regional compile, batch buckets, compile cache),
``preprocess``, ``embedcache`` (the LRU of SAM image embeddings), ``tiny`` (random-weight models
from configs), ``tracker`` (SAM 2.1 video: a streaming session pruned to the model's memory
window), ``video`` (its loading), ``sam3_video`` (SAM 3's text → tracked instances), ``msda``
(Grounding DINO's deformable attention as a fused Triton kernel on CUDA; Triton is imported only
there, by ``msda_kernel``).

Coordinates in and out are pixels of the EXIF-transposed image; results are the torch-free types
of :mod:`backend.results`. May import only the foundation modules (settings, errors, results,
batching); this ``__init__`` imports nothing, so importing one engine module never loads the
others. Only :mod:`backend.pipeline` imports the engine, lazily (the web process never does).
"""
