"""Logging for every entry point (``_wsgi.py``, ``python -m backend ...``): one line per record.

Task ids, URLs, prompts and local-files paths come from whoever can call ``/predict``; a newline in
one of them would let the caller forge log lines (``task 1\\nERROR admin password changed``). The
modules log such values with ``%s`` like any other, and :class:`SingleLineFilter`, installed on the
root handler, escapes control characters in the *formatted message* of every record, so no call
site can forget. Tracebacks (``exc_info``) stay multi-line: they are ours, not the caller's.
"""

from __future__ import annotations

import logging
import re

__all__ = ["SingleLineFilter", "configure_logging", "escape_control"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 and C1 control characters except TAB, plus DEL and the Unicode line/paragraph separators, which
# some log viewers also break lines on.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return {0x0A: "\\n", 0x0D: "\\r"}.get(code) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_control(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL.sub(_escaped, text)


class SingleLineFilter(logging.Filter):
    """Make a record's message one line: formats it once, escapes control characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: let the handler report it as usual
            return True
        escaped = escape_control(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def configure_logging(level: str = "INFO") -> None:
    """Root logging to stderr at ``level``, every handler with :class:`SingleLineFilter`.

    Idempotent: a second call only changes the level (gunicorn imports ``_wsgi`` once per worker).
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    root.setLevel(level.upper())
    for handler in root.handlers:
        if not any(isinstance(f, SingleLineFilter) for f in handler.filters):
            handler.addFilter(SingleLineFilter())
