"""Queue mode's RQ transport: the web process enqueues, ``python -m backend worker`` processes run.

Owns: the queues, the JSON serializer and the allow-listed job class (:mod:`~backend.queue.transport`);
worker liveness, the model versions live workers serve and re-queueing a dead worker's jobs
(:mod:`~backend.queue.liveness`); every Redis key name (:mod:`~backend.queue.keys`); connecting and
the one Redis backoff (:mod:`~backend.queue.connection`); the interactive client the web process
uses (:mod:`~backend.queue.client`); the interactive job function (:mod:`~backend.queue.jobs`) and
the resident pipeline job functions read (:mod:`~backend.queue.resident`).

May import pipeline, ls and foundation modules; never bulk, modes or web (the worker process that
wires bulk's chunk job in is :mod:`backend.modes.worker`). Importing it never imports torch.
"""
