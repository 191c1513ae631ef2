"""Every Redis key this backend writes, named in one place (as rq does in its own modules).

``<id>`` is a bulk run id (16 lowercase hex characters). Every key expires; the TTLs live with the
code that writes the key, the names live here::

    gsam:workers                 sorted set worker name -> when its liveness expires
    gsam:worker-info             hash worker name -> JSON: the engine, model version and checkpoints it serves
    gsam:reaper-lock             which worker runs the housekeeping round (SET NX PX)
    gsam:worker-errors           sorted set: why a worker could not load its models -> when that expires
    gsam:run:<id>                hash: the run's record (status, spec, chunk, timestamps, error)
    gsam:run:<id>:tasks          set of the run's task ids
    gsam:run:<id>:done           set of task ids written back (or found already labeled)
    gsam:run:<id>:failed         hash task id -> reason
    gsam:run:<id>:jobs           set of the run's RQ job ids
    gsam:run:<id>:lease          the run's supervisor: its owner token (SET PX)
    gsam:run-index               sorted set run id -> when its record expires
    gsam:lock:<project>:<task>:<sha1(model_version)[:16]>   write-back lock (SET NX PX)
    gsam:project:<project>       hash: a project's settings (``options`` JSON, remembered ``prompt``)

Pub/sub channels (no key is written)::

    gsam:prewarm                 warm requests for every worker (:mod:`backend.queue.prewarm`)

RQ's own keys (``rq:job:*``, ``rq:queue:*``, registries) are RQ's; jobs are given TTLs when enqueued.
Imports nothing of the backend.
"""

from __future__ import annotations

import hashlib
import re

WORKERS = "gsam:workers"
WORKER_INFO = "gsam:worker-info"
REAPER_LOCK = "gsam:reaper-lock"
WORKER_ERRORS = "gsam:worker-errors"
RUN_PREFIX = "gsam:run:"
RUN_INDEX = "gsam:run-index"
LOCK_PREFIX = "gsam:lock:"
RUN_PARTS = ("tasks", "done", "failed", "jobs", "lease")
#: A bulk run's id: 16 lowercase hex characters (``backend.bulk.runstore.new_run_id``).
RUN_ID = re.compile(r"[0-9a-f]{16}")
PROJECT_PREFIX = "gsam:project:"
PREWARM_CHANNEL = "gsam:prewarm"


def run_key(run_id: str, part: str | None = None) -> str:
    """The run's record (hash), or one of its parts: ``tasks``, ``done``, ``failed``, ``jobs``, ``lease``.

    Any string names a key under ``gsam:run:`` (a store asked for an unknown run answers None); ids
    that come from outside (a route, a job argument that crossed Redis) are checked against
    :data:`RUN_ID` first."""
    if part is not None and part not in RUN_PARTS:
        raise ValueError(f"a run has no key part {part!r}; use one of {', '.join(RUN_PARTS)}")
    return f"{RUN_PREFIX}{run_id}" if part is None else f"{RUN_PREFIX}{run_id}:{part}"


def jobs_key(run_id: str) -> str:
    """The set of a run's RQ job ids."""
    return run_key(run_id, "jobs")


def lease_key(run_id: str) -> str:
    """Who supervises the run (owner token, expires unless refreshed)."""
    return run_key(run_id, "lease")


def write_lock_key(project: int, task_id: int, model_version: str) -> str:
    """The lock a writer holds while it writes one task's prediction of one model version."""
    digest = hashlib.sha1(model_version.encode()).hexdigest()[:16]
    return f"{LOCK_PREFIX}{project}:{task_id}:{digest}"


def project_key(project: int) -> str:
    """A Label Studio project's settings (see :mod:`backend.modes.projects`)."""
    if isinstance(project, bool) or not isinstance(project, int) or project < 1:
        raise ValueError(f"a project key needs a positive integer project id, not {project!r}")
    return f"{PROJECT_PREFIX}{project}"
