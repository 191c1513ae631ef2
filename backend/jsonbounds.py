"""JSON text parsed with a nesting bound checked before parsing, for every JSON that crosses a trust
boundary (request bodies, pub/sub messages).

Hostile nesting (``"[" * 10**6``) is a ValueError with a message, never a RecursionError: the depth
is counted at C speed (a regex and numpy) and with no recursion before ``json.loads`` runs.
Imports nothing of the backend.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_JSON_DEPTH = 100  # LS bodies nest ~10 levels (task → annotations → result → value → points)

# A JSON string literal; an unterminated one runs to the end of the text. The closing quote is
# optional so a match never fails: a failing match would restart at every later quote, which makes
# one unterminated string full of escaped quotes cost quadratic time (minutes for 100 kB).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_DEPTH_CHUNK = 2**20


class JsonTooDeep(ValueError):
    """A JSON text nests deeper than :data:`MAX_JSON_DEPTH` (a ValueError, as json's own errors)."""


def json_depth(data: bytes) -> int:
    """How deep ``data``'s brackets nest, outside string literals, without parsing it.

    Exact for valid JSON; for invalid JSON it is some number, and the parser rejects the text anyway.
    """
    codes = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    depth = peak = 0
    for start in range(0, len(codes), _DEPTH_CHUNK):  # chunks bound the int32 temporaries
        part = codes[start:start + _DEPTH_CHUNK]
        steps = ((part == ord("[")) | (part == ord("{"))).astype(np.int32) - ((part == ord("]")) | (part == ord("}")))
        running = np.cumsum(steps) + depth
        peak, depth = max(peak, int(running.max(initial=depth))), int(running[-1]) if len(running) else depth
    return peak


def loads_bounded(data: bytes | str) -> Any:
    """``json.loads`` that refuses nesting deeper than :data:`MAX_JSON_DEPTH` before parsing.

    Raises :class:`JsonTooDeep` or ``json.JSONDecodeError`` (both ValueErrors, with a message)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise JsonTooDeep(f"the JSON body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    return json.loads(raw)
