"""How a deployment hosts the pipeline: one object per mode, built once, and the worker process.

- :mod:`backend.modes.base`: the :class:`~backend.modes.base.Backend` interface the web layer and the
  CLI use (predict, health, bulk runs, model version); :mod:`backend.modes.factory`: ``build_backend``,
  the one place that looks at ``REDIS_URL``;
- :mod:`backend.modes.embedded`: the models run in this process (no Redis);
- :mod:`backend.modes.queued`: this process enqueues on RQ and never imports torch; workers run the models;
- :mod:`backend.modes.projects`: per-project options (``extra_params``) and remembered prompts,
  in memory (embedded) or Redis (queue mode);
- :mod:`backend.modes.worker`: the RQ worker process (models resident, housekeeping, adoption of runs).

May import bulk, queue, pipeline, ls and the foundation modules; only web, cli and the top-level
entry points (``_wsgi.py``, ``model.py``) import it.
"""
