"""Logging setup shared by the master, the workers and the CLI tools.

Two line formats (``[server] log_format``):

- ``text``: ``time level [pid] logger: message`` where structured events (the session-end
  line, refusals) are ``key=value`` pairs; a value with spaces or quotes is double-quoted
  (logfmt), so ``end="client closed"`` reads as written.
- ``json``: one JSON object per line, ``{"time", "level", "pid", "logger", "msg", ...}``
  plus the event's fields as their own keys.

Structured events go through ``event(logger, level, name, **fields)``; nothing here ever
receives a password: sessions pass login names, never credentials or AUTH payloads.

A worker holds its session-end lines (``held_event``) for up to HOLD_SECONDS and writes them
together: written alone, in the middle of a session, a line cost the worker about 30 µs of
CPU (6 µs in a loop of lines: alone, every piece of code it runs starts from cold caches);
in batches of about 40, 11 µs, in writes of up to WRITE_BYTES (a session: about 5 % less CPU,
``python -m bench.ab``).  Any other line first writes what is held, so the file keeps its
order; a worker writes what it holds before it exits (a worker killed outright loses at
most HOLD_SECONDS of session-end lines).
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
HOLD_SECONDS = 0.05      # the longest a held line waits (hold_lines)
MAX_HELD = 64            # held lines written at once however young
WRITE_BYTES = 4096       # PIPE_BUF: a write up to this size to a pipe (or journald's socket)
                         # is not interleaved with another worker's


def setup(level: str = "info", fmt: str = "text") -> None:
    """Log lines to stderr; idempotent (a forked worker calls it again)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _Handler(sys.stderr)
    # The C RLock, which gevent leaves alone: in a worker, gevent's patching makes logging's
    # own lock a Python RLock over a gevent lock (four Python calls per line).  No greenlet
    # can switch inside a write to stderr, and real threads still exclude each other.
    handler.lock = _thread.RLock()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(FORMAT))
    root.addHandler(handler)
    global _direct, _held
    _direct = handler if fmt == "text" else None
    _held = None           # a worker holds lines again once it calls hold_lines
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


class _Handler(logging.StreamHandler):
    """setup()'s handler: a record first writes the lines a worker holds (the file's order)."""

    def emit(self, record) -> None:
        if _held:
            write_held()
        super().emit(record)


_direct: _Handler | None = None   # setup()'s handler, for text lines
_held: list | None = None         # (time, level, logger, _Event) while a worker holds lines
_arm = None                       # hold_lines()'s ``schedule``


def event(logger: logging.Logger, level: int, name: str, **fields) -> None:
    """Log one structured event (``fields`` values: str, int, float, bool or None).

    While setup()'s text handler is the only one the event would reach, the line is written
    as that handler would write it, without the logging module's record and handler chain
    (a third of the line's cost); anything else (JSON, another handler or a filter
    somewhere, as in a test capturing logs) goes through it."""
    _event(logger, level, name, fields, False)


def held_event(logger: logging.Logger, level: int, name: str, **fields) -> None:
    """``event``, but in a worker that holds lines (``hold_lines``) the line waits for the
    next batch, at most HOLD_SECONDS (the session-end line)."""
    _event(logger, level, name, fields, True)


def _event(logger: logging.Logger, level: int, name: str, fields: dict, hold: bool) -> None:
    if not logger.isEnabledFor(level):
        return
    message = _Event(name, fields)
    handler = _direct
    if handler is not None and level >= handler.level and _reaches_only(logger, handler):
        held = _held
        if hold and held is not None:
            held.append((time.time(), level, logger.name, message))
            if len(held) >= MAX_HELD:
                write_held()
            elif len(held) == 1:
                _arm()
            return
        if _write(handler, [_line(handler, time.time(), level, logger.name, message)]):
            return
    logger.log(level, message)


def _line(handler: _Handler, created: float, level: int, name: str, message) -> str:
    """The line ``handler`` would write for a record of these (the text format)."""
    return FORMAT % {"asctime": handler.formatter.time_text(created),
                     "levelname": logging.getLevelName(level), "process": _pid,
                     "name": name, "message": message} + "\n"


def _write(handler: _Handler, lines: list[str]) -> bool:
    """Write held lines, then ``lines``, in writes of whole lines up to WRITE_BYTES; False
    if the stream failed (the caller lets the logging module report it)."""
    handler.acquire()
    try:
        if _held:
            lines = [_line(handler, *item) for item in _held] + lines
            _held.clear()
        stream, chunk, size = handler.stream, [], 0
        for line in lines:
            length = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
            if chunk and size + length > WRITE_BYTES:
                stream.write("".join(chunk))
                stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += length
        if chunk:
            stream.write("".join(chunk))
            stream.flush()
        return True
    except Exception:  # noqa: BLE001 - the logging module reports the failure
        return False
    finally:
        handler.release()


def hold_lines(schedule) -> None:
    """From now on hold the lines of ``held_event``: ``schedule()`` is called when the first
    one is held and must see that ``write_held()`` runs within HOLD_SECONDS (a worker: a
    timer on its event loop).  The process must call ``write_held()`` before it exits."""
    global _held, _arm
    _held, _arm = [], schedule


def write_held() -> None:
    """Write the lines held so far (the worker's timer, MAX_HELD, any other line, exit)."""
    handler = _direct
    if not _held or handler is None:
        return
    count = len(_held)
    if not _write(handler, []):
        logging.getLogger(__name__).error("%d log lines could not be written", count)


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
