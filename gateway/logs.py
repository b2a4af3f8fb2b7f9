"""Logging setup shared by the master, the workers and the CLI tools.

Two line formats (``[server] log_format``):

- ``text``: ``time level [pid] logger: message`` where structured events (the session-end
  line, refusals) are ``key=value`` pairs; a value with spaces or quotes is double-quoted
  (logfmt), so ``end="client closed"`` reads as written.
- ``json``: one JSON object per line, ``{"time", "level", "pid", "logger", "msg", ...}``
  plus the event's fields as their own keys.

Structured events go through ``event(logger, level, name, **fields)``; nothing here ever
receives a password: sessions pass login names, never credentials or AUTH payloads.
"""
from __future__ import annotations

import _thread
import json
import logging
import os
import re
import sys
import time

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
FORMATS = ("text", "json")
MAX_VALUE = 200


def setup(level: str = "info", fmt: str = "text") -> None:
    """Log lines to stderr; idempotent (a forked worker calls it again)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    # The C RLock, which gevent leaves alone: in a worker, gevent's patching makes logging's
    # own lock a Python RLock over a gevent lock (four Python calls per line).  No greenlet
    # can switch inside a write to stderr, and real threads still exclude each other.
    handler.lock = _thread.RLock()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(FORMAT))
    root.addHandler(handler)
    global _direct
    _direct = handler if fmt == "text" else None
    root.setLevel(level.upper())
    # No format here names the caller's file, line or function: skip the stack walk that
    # finds them for every record (the logging module's own switch for this); nor a thread
    # or multiprocessing name.  The process id is filled in by our formatters from a copy
    # taken here (a forked worker calls setup again): getpid is a system call per record.
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = logging.logProcesses = False
    _forked()


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class TextFormatter(logging.Formatter):
    """logging.Formatter with the date and time part of ``asctime`` made once per second
    (every session leaves a line; strftime per line was a visible share of a login)."""

    _second = -1
    _prefix = ""

    def format(self, record) -> str:
        if record.process is None:
            record.process = _pid
        return super().format(record)

    def formatTime(self, record, datefmt=None) -> str:  # noqa: N802 - logging's name
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.time_text(record.created)

    def time_text(self, created: float) -> str:
        """``asctime`` of a record made at ``created`` (logging's msecs: the truncated ms)."""
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
            self._second = second
        return f"{self._prefix},{int((created - second) * 1000):03d}"


class _Event:
    """A log message made of fields: rendered as key=value unless the formatter is JSON."""

    __slots__ = ("name", "fields")

    def __init__(self, name: str, fields: dict):
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        return " ".join([f"event={self.name}"] +
                        [f"{key}={_kv_value(value)}" for key, value in self.fields.items()])


_direct: logging.StreamHandler | None = None   # setup()'s handler, for text lines


def event(logger: logging.Logger, level: int, name: str, **fields) -> None:
    """Log one structured event (``fields`` values: str, int, float, bool or None).

    Every session ends with one: while setup()'s text handler is the only one the event
    would reach, the line is written as that handler would write it, without the logging
    module's record and handler chain (a third of the line's cost); anything else (JSON,
    another handler or a filter somewhere, as in a test capturing logs) goes through it."""
    if not logger.isEnabledFor(level):
        return
    message = _Event(name, fields)
    handler = _direct
    if handler is not None and level >= handler.level and _reaches_only(logger, handler):
        line = FORMAT % {"asctime": handler.formatter.time_text(time.time()),
                         "levelname": logging.getLevelName(level), "process": _pid,
                         "name": logger.name, "message": message} + "\n"
        handler.acquire()
        try:
            handler.stream.write(line)
            handler.stream.flush()
            return
        except Exception:  # noqa: BLE001 - the logging module reports the failure
            pass
        finally:
            handler.release()
    logger.log(level, message)


def _reaches_only(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Whether a record of ``logger`` would reach ``handler`` alone, and no filter."""
    node = logger
    while node is not None:
        if node.filters:
            return False
        if node.handlers:
            return node.parent is None and node.handlers == [handler] and not handler.filters
        if not node.propagate:
            return False
        node = node.parent
    return False


def readable(text: str) -> str:
    """A client-supplied string made safe for one log line: control characters escaped,
    bounded; spaces and letters (any script) stay as they are."""
    if text.isprintable():
        return text[:MAX_VALUE]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text[:MAX_VALUE])


def _kv_value(value) -> str:
    kind = type(value)
    # The common values first (a session-end line has thirteen): a plain string, an int.
    if kind is str and value and len(value) <= MAX_VALUE and value.isprintable() \
            and _NEEDS_QUOTES.search(value) is None:
        return value
    if kind is int:
        return str(value)
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = readable(str(value))
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


class JsonFormatter(logging.Formatter):
    """One JSON object per line; an event's fields become keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "pid": _pid if record.process is None else record.process,
                "logger": record.name}
        message = record.msg
        if isinstance(message, _Event) and not record.args:
            line["event"] = message.name
            for key, value in message.fields.items():
                line.setdefault(key, readable(value) if isinstance(value, str) else value)
        else:
            line["msg"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)
