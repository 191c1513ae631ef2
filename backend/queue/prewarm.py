"""Pre-warming in queue mode: the web process broadcasts a :class:`WarmRequest` to every worker over
Redis pub/sub (:data:`~backend.queue.keys.PREWARM_CHANNEL`); each worker hands it to its own
:class:`~backend.pipeline.prewarm.Prewarmer`, which encodes into that worker's embedding cache.

Why every worker: each worker holds its own embedding cache, and an annotator's next click is an
``interactive`` job that any worker may take, so the next task is a cache hit only if the worker
that takes the click has it. Each worker does the encoding between jobs, at the Prewarmer's low
priority (a click waits for at most one encoder call).

Why pub/sub, not jobs: a message is delivered to every subscriber at once and writes no key (nothing
to expire, nothing left for a worker that is gone). A worker that is not listening at that moment
(starting, reconnecting) misses it, which costs only a cold first click: pre-warming is best effort.

Trust: anyone who can publish on the Redis server can send a message, so a message is size- and
depth-bounded JSON (never pickle), checked by :meth:`WarmRequest.from_json`; a bad one is logged
(reason only) and dropped, and the listener goes on.

Imports the pipeline's torch-free request type, the key names and the connection helpers.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

import redis

from backend.jsonbounds import loads_bounded
from backend.pipeline.prewarm import WarmRequest
from backend.queue import keys
from backend.queue.connection import backoff, connect

log = logging.getLogger(__name__)

#: A label config of a few thousand labels fits; anything larger is not ours.
MAX_MESSAGE_BYTES = 2**20
POLL_S = 1.0  # how often the listener looks at its stop flag while no message comes


def publish_warm(connection: redis.Redis, request: WarmRequest) -> int:
    """Send ``request`` to every listening worker; how many received it (0: none is listening).
    Raises ``redis.RedisError`` when Redis is unreachable."""
    return int(connection.publish(keys.PREWARM_CHANNEL, json.dumps(request.to_json())))


def parse_message(data: object) -> WarmRequest:
    """A message's :class:`WarmRequest`; ValueError saying what is wrong with it."""
    if not isinstance(data, (bytes, str)):
        raise ValueError(f"a warm message is JSON text, not {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"a warm message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte bound")
    return WarmRequest.from_json(loads_bounded(data))  # JSON errors and JsonTooDeep are ValueErrors


class WarmListener:
    """A daemon thread that subscribes to the warm channel and calls ``on_request`` for each valid
    message, in the order they come; reconnects with backoff while Redis is away.

    ``on_request`` must return at once (:meth:`Prewarmer.submit` does): it runs on this thread."""

    def __init__(self, redis_url: str, on_request: Callable[[WarmRequest], None]):
        self.redis_url = redis_url
        self.on_request = on_request
        self.subscribed = threading.Event()  # set while subscribed (tests wait for it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WarmListener:
        self._thread = threading.Thread(target=self._run, name="gsam-warm-listener", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        pauses = backoff(1.0, 30.0)
        while not self._stop.is_set():
            try:
                self._listen()
                return
            except redis.RedisError as exc:
                self.subscribed.clear()
                pause = next(pauses)
                log.warning("pre-warming: Redis unreachable (%s); listening again in %.0f s",
                            type(exc).__name__, pause)
                self._stop.wait(pause)

    def _listen(self) -> None:
        # get_message reads only once data is there, so the socket timeout never fires while idle
        pubsub = connect(self.redis_url).pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.PREWARM_CHANNEL)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=POLL_S)
                if pubsub.subscribed:
                    self.subscribed.set()
                if message is None or message.get("type") != "message":
                    continue
                try:
                    request = parse_message(message.get("data"))
                except ValueError as exc:
                    # the record's control characters are escaped by logsetup's filter
                    log.warning("pre-warming: a message on %s was dropped: %.300s", keys.PREWARM_CHANNEL, exc)
                    continue
                self.on_request(request)
        finally:
            self.subscribed.clear()
            pubsub.close()


__all__ = ["WarmListener", "publish_warm", "parse_message", "MAX_MESSAGE_BYTES"]
