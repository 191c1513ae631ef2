"""Adoption: a worker takes over the bulk runs whose supervisor died (:func:`adopt_orphaned_runs`).

When the process that supervises a run dies (a web process restarted mid-run, a killed CLI), its
lease (``gsam:run:<id>:lease``) expires. A worker's housekeeping (one worker at a time, every few
seconds) calls :func:`adopt_orphaned_runs`, which takes the lease of each such run and starts a
:class:`~backend.bulk.supervisor.Supervisor` thread in that worker (``adopted=True``: it re-plans a
run that died ``planning``, or enqueues the pending tasks no job in flight covers).

Imports the bulk store and supervisor, :mod:`backend.queue.connection`, and RQ lazily (through
:class:`~backend.bulk.chunkjob.RqChunkQueue`) when no chunk queue is given.
"""

from __future__ import annotations

import logging
import threading
import uuid

from backend.bulk.redisstore import RedisRunStore
from backend.bulk.spec import PrelabelSpec
from backend.bulk.supervisor import POLL_S, STALL_S, ChunkQueue, Supervisor
from backend.ls.client import LabelStudioApi
from backend.queue.connection import connect
from backend.settings import Settings

log = logging.getLogger(__name__)

#: Tasks per job for a run whose record does not say (runs recorded before the chunk was kept).
FALLBACK_CHUNK = 16


def adopt_orphaned_runs(settings: Settings, connection, *, chunks: ChunkQueue | None = None) -> list[str]:
    """For each planning or running run whose lease expired, take the lease and start a supervisor
    thread here. Returns the ids of the runs adopted. Needs LS credentials (to plan and to read task
    data); a process without them adopts nothing. ``chunks``: where the chunks go (default: RQ on a
    connection of the supervisor's own)."""
    if not settings.has_label_studio_credentials:
        return []
    store = RedisRunStore(connection)
    adopted = []
    for run_id in store.active_run_ids():
        owner = uuid.uuid4().hex
        if not store.take_lease(run_id, owner):  # free leases only: a live supervisor keeps refreshing its own
            continue
        try:
            spec, chunk = store.spec(run_id), store.chunk(run_id) or FALLBACK_CHUNK
        except (ValueError, KeyError, TypeError) as exc:  # unreadable here: keep the lease, so retry when it expires
            log.error("run %s: unreadable record (%s): not adopting it", run_id, type(exc).__name__)
            continue
        if spec is None:
            store.release_lease(run_id, owner)
            continue
        log.warning("run %s (project %s): its supervisor is gone; adopting it", run_id, spec.project)
        threading.Thread(target=_supervise_adopted, args=(settings, run_id, spec, chunk, owner, chunks),
                         name=f"adopted-{run_id}", daemon=True).start()
        adopted.append(run_id)
    return adopted


def _supervise_adopted(settings: Settings, run_id: str, spec: PrelabelSpec, chunk: int, owner: str,
                       chunks: ChunkQueue | None) -> None:
    connection = connect(settings.redis_url)  # its own: the supervisor outlives this housekeeping round
    try:
        if chunks is None:
            from backend.bulk.chunkjob import RqChunkQueue

            chunks = RqChunkQueue(connection)
        with LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key) as api:
            final = Supervisor(RedisRunStore(connection), chunks, run_id, spec, None, chunk, api, poll_s=POLL_S,
                               stall_s=STALL_S, owner=owner, adopted=True).run(False)
        log.info("adopted run %s ended: %s, %d done, %d failed of %d", run_id, final.status, final.done,
                 final.failed, final.total)
    except Exception:  # noqa: BLE001 - the lease expires and another round (here or in another worker) tries again
        log.exception("adopted run %s: supervision stopped", run_id)
    finally:
        connection.close()


__all__ = ["adopt_orphaned_runs"]
