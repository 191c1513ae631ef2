"""One predict call through the stages: tasks → images → engine → regions.

Owns :class:`~backend.pipeline.predict.Pipeline` (the long-lived parts of a process: the engine,
created once on first use under a lock; the image loader; the metrics; and the overlapped
load → engine → encode loop) and :mod:`~backend.pipeline.refine` (smart-tool clicks and boxes → SAM
prompts on a cached embedding → masks → regions).

May import ls, images, engine (only inside ``Pipeline.engine()``, so importing the pipeline never
loads torch) and the foundation modules; queue, bulk and modes build on it, never the reverse.
"""
