"""How a deployment hosts the pipeline: one object per mode, built once, and the worker process.

- :mod:`backend.modes.base`: the :class:`~backend.modes.base.Backend` interface the web layer and the
  CLI use (predict, health, bulk runs, model version); :mod:`backend.modes.factory`: ``build_backend``,
  the one place that looks at ``REDIS_URL``;
- :mod:`backend.modes.embedded`: the models run in this process (no Redis);
- :mod:`backend.modes.queued`: this process enqueues on RQ and never imports torch; workers run the models;
- :mod:`backend.modes.projects`: per-project options (``extra_params``) and remembered prompts,
  in memory (embedded) or Redis (queue mode);
- :mod:`backend.modes.retrieve`: LS's "Retrieve predictions" answered within ``RETRIEVE_BUDGET``, the
  rest handed to a bulk run;
- :mod:`backend.modes.worker`: the RQ worker process (models resident, housekeeping, adoption of runs,
  its own click queue and its engine's queues).

Which engine answers a project (``extra_params.engine`` / ``model_version``) is resolved by
:mod:`backend.ls.engines` against what each mode serves: ENGINES' pipelines, or the live workers.

May import bulk, queue, pipeline, ls and the foundation modules; only web, cli and the top-level
entry points (``_wsgi.py``, ``model.py``) import it.
"""
