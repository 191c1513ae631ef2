"""Bulk pre-label runs: label every task of a Label Studio project and write the predictions back.

What it owns, module by module:

- :mod:`~backend.bulk.request`: what an admin asks (:class:`RunRequest`, the chunk bounds);
- :mod:`~backend.bulk.spec`: what a run does (:class:`PrelabelSpec`) and works on (:class:`BulkTask`);
- :mod:`~backend.bulk.prelabel`: plan (which tasks) and process chunks (pipeline, then idempotent
  write-back under a per-task lock);
- :mod:`~backend.bulk.status`, :mod:`~backend.bulk.runstore`, :mod:`~backend.bulk.memorystore`,
  :mod:`~backend.bulk.redisstore`, :mod:`~backend.bulk.writelock`: run records and write locks;
- :mod:`~backend.bulk.runs`: the :class:`Runs` interface the web layer and the CLI use, one
  implementation per mode (:class:`EmbeddedRuns`, :class:`QueueRuns`);
- :mod:`~backend.bulk.supervisor`, :mod:`~backend.bulk.chunkjob`, :mod:`~backend.bulk.adopt`: queue
  mode's supervision, its RQ jobs, and the adoption of runs whose supervisor died;
- :mod:`~backend.bulk.progress`: the CLI's progress bar.

May import :mod:`backend.queue`, :mod:`backend.pipeline`, :mod:`backend.ls` and the foundation
modules; never :mod:`backend.modes` or :mod:`backend.web`. Embedded mode imports neither redis-py
nor RQ (only :mod:`~backend.bulk.chunkjob` imports RQ), and nothing here imports torch.
"""
