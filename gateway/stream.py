"""The one socket reader: bytes from a socket, cut into events by a pure framer.

Used by both protocols and both sides (client before login, back-end during login, the
routing relay's links).  It carries the bounds every read must have:

* time: the socket's idle timeout per read, and an optional total ``deadline`` (a
  ``time.monotonic()`` value) for a whole phase, so a peer sending one byte a second cannot
  stretch a phase for ever (slowloris);
* size: the framer bounds lines and literals; the reader holds at most one ``recv`` worth of
  unframed bytes;
* fairness: a peer whose bytes are always ready would never let gevent switch, so the reader
  yields to the hub after ``PACE_SECONDS`` of reading without a wait (the worker's other
  sessions and its heartbeat keep running); a read that waited has let them run already.

Bytes are framed lazily, one line (or one literal's worth) at a time, only when an event is
asked for, so whatever the owner has not asked for yet is still raw: ``leftover()`` hands it
to a relay unframed (e.g. an APPEND pipelined after LOGIN is not judged by pre-login limits).

The framer is any object with ``feed(bytes) -> list[event]`` and ``pending() -> bytes``
(gateway.imap.parser.Framer, gateway.pop3.framer.LineFramer); an ``in_literal`` attribute,
when present, says how many payload bytes may be framed in one go, and ``take_raw`` (a
caller framing bytes itself) needs ``between_lines``, true when the next byte starts a line;
with a ``line_at`` as well, ``next_event`` takes a whole line straight from the received
bytes (a LOGIN command, a back-end's answers during a login: the framer's own work would make
the same event at several times the cost).
"""
from __future__ import annotations

import socket
import time
from collections import deque

PACE_SECONDS = 0.002    # longest stretch of reading before the loop is given back


class ReadError(Exception):
    """The read could not complete; ``str()`` is the reason for the session log."""


class PeerClosed(ReadError):
    """The peer closed the connection."""


class ReadTimeout(ReadError):
    """No byte within the socket's timeout (the idle bound)."""


class DeadlineExceeded(ReadTimeout):
    """The phase's total deadline passed (the total bound)."""


# gevent and its socket module, loaded by a worker's first read (the master, which loads
# config and this module, never imports gevent); module globals, not an import statement per
# call: ``from gevent import ...`` runs importlib's _handle_fromlist, a Python call, each time.
_gevent = None
_gevent_socket = None
_PlainSocket: type | None = None     # gevent's socket class, once loaded


def _load_gevent() -> None:
    global _gevent, _gevent_socket, _PlainSocket
    import gevent
    from gevent import socket as gsocket
    _gevent, _gevent_socket, _PlainSocket = gevent, gsocket, gsocket.socket


def _yield_to_hub() -> None:
    if _gevent is None:
        _load_gevent()
    _gevent.sleep(0)


def throw_after(seconds: float, expired, hub=None):
    """A started loop timer that throws ``expired`` (an exception, or a class: made only if
    it fires) into the calling greenlet after ``seconds``; the caller closes it.  What
    gevent's ``Timeout`` does, at a third of the cost (no Timeout object, which is an
    exception instance with a timer of its own)."""
    if _gevent is None:
        _load_gevent()
    timer = (hub or _gevent.get_hub()).loop.timer(max(seconds, 0.0), priority=-1)
    timer.start(_gevent.getcurrent().throw, expired, update=True)
    return timer


def wait_io(watcher, timeout: float | None, expired) -> None:
    """Wait until ``watcher`` (an I/O watcher, not started) fires; raise ``expired`` (as
    throw_after) after ``timeout`` seconds (gevent's ``wait`` with a ``Timeout`` per call
    cost 2.1 µs against 0.6 here, and every login waits four times)."""
    if _gevent is None:
        _load_gevent()
    hub = _gevent.get_hub()
    if timeout is None:
        hub.wait(watcher)
        return
    timer = throw_after(timeout, expired, hub)
    try:
        hub.wait(watcher)
    finally:
        timer.close()


def plain_socket_type() -> type:
    """gevent's socket class (a plain, not TLS, connection is one)."""
    if _PlainSocket is None:
        _load_gevent()
    return _PlainSocket


def is_tls(sock) -> bool:
    """Whether ``sock`` is a TLS connection (gateway.tlsconn's have ``is_tls``).  A plain
    gevent socket is told by its type: asked for a name it lacks, its ``__getattr__`` makes
    and formats an AttributeError (three per login, when each place asked the socket)."""
    if type(sock) is (_PlainSocket or plain_socket_type()):
        return False
    return getattr(sock, "is_tls", False)


class StreamReader:
    """Events from ``sock`` through ``framer``; see the module docstring for the bounds.

    ``next_event()`` returns the next framer event or raises ReadError (timeouts, EOF,
    socket errors) or the framer's own error (a ParseError for IMAP).  ``on_bytes(n)``, if
    given, is called with the size of every chunk received (byte counters, activity).
    """

    def __init__(self, sock, framer, recv_size: int = 16384, on_bytes=None):
        self.sock = sock
        self.framer = framer
        self.recv_size = recv_size
        self.on_bytes = on_bytes
        self.deadline: float | None = None
        self.idle_timeout: float | None = sock.gettimeout() if sock is not None else None
        self.events: deque = deque()
        # The framer's ``line_at``: whole plain lines are taken without framing them (a
        # reader that replaces its framer sets it again).
        self.line_at = getattr(framer, "line_at", None)
        self.raw = b""          # received, not yet framed
        self.raw_pos = 0
        self.paced_at = time.monotonic()
        # Something was just sent that the peer must answer: wait for readability before
        # the first recv (else that recv would mostly come back empty, EAGAIN: a wasted call).
        self.answer_due = False

    # -- reading ------------------------------------------------------------------------------

    def next_event(self):
        """The next event; reads the socket only when nothing is buffered."""
        if self.line_at is not None and not self.events:
            line = self.take_raw(self.line_at, receive=True)
            if line is not None:
                return line
        while not self.events:
            if self.raw_pos < len(self.raw):
                self._frame_more()
            else:
                self._receive()
        self._pace()
        return self.events.popleft()

    def has_buffered(self) -> bool:
        """Whether an event or unframed bytes are waiting (no read needed to go on)."""
        return bool(self.events) or self.raw_pos < len(self.raw)

    def _frame_more(self) -> None:
        """Feed the framer one line, or one literal's worth of bytes, from the raw buffer."""
        start = self.raw_pos
        in_literal = getattr(self.framer, "in_literal", 0)
        if in_literal:
            stop = min(len(self.raw), start + in_literal)
        else:
            newline = self.raw.find(b"\n", start)
            stop = len(self.raw) if newline < 0 else newline + 1
        self.raw_pos = stop
        piece = self.raw if start == 0 and stop == len(self.raw) else self.raw[start:stop]
        self.events.extend(self.framer.feed(piece))

    def _receive(self) -> None:
        timeout = self.idle_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("deadline passed")
            timeout = left if timeout is None else min(timeout, left)
        sock = self.sock
        try:
            # The timeout also bounds the next sendall on this socket.
            if type(sock) is (_PlainSocket or plain_socket_type()):
                if sock.timeout != timeout:       # (gevent's settimeout is Python code)
                    sock.settimeout(timeout)
                data = self._recv_plain(sock, timeout)
            else:     # TLS: bytes may wait decrypted inside OpenSSL; its recv waits itself
                sock.settimeout(timeout)
                data = sock.recv(self.recv_size)
        except socket.timeout:
            if self.deadline is not None and time.monotonic() >= self.deadline - 0.001:
                raise DeadlineExceeded("deadline passed") from None
            raise ReadTimeout("timed out") from None
        except OSError as exc:
            raise ReadError(f"read error: {exc.strerror or exc}") from None
        if not data:
            raise PeerClosed("closed the connection")
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        self.raw, self.raw_pos = data, 0
        # Whole lines came: the peer has most likely said all it had for now (a back-end's
        # untagged ID answer, its tagged LOGIN answer still being worked out).
        self.answer_due = data[-1:] == b"\n"

    def _recv_plain(self, sock, timeout: float | None) -> bytes:
        """recv on a plain gevent socket's descriptor, waiting on its own read watcher when
        nothing is there (first, when an answer is due).  A wait lets the loop run the
        other sessions: the pacing clock starts again after it."""
        raw = sock._sock
        if not self.answer_due:
            try:
                return raw.recv(self.recv_size)
            except BlockingIOError:
                pass
        self.answer_due = False
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_io(sock._read_event, timeout, socket.timeout)
            self.paced_at = now = time.monotonic()
            try:
                return raw.recv(self.recv_size)
            except BlockingIOError:      # woken without bytes: wait for the rest of the time
                if until is not None:
                    timeout = until - now
                    if timeout <= 0:
                        raise socket.timeout("timed out") from None

    def _pace(self) -> None:
        now = time.monotonic()
        if now - self.paced_at >= PACE_SECONDS:
            _yield_to_hub()
            self.paced_at = time.monotonic()

    def take_raw(self, accept, receive: bool = False):
        """A caller's own framing of bytes already received, when nothing is framed or
        held partial: ``accept(raw, start)`` looks at the unframed bytes ``raw[start:]`` and
        returns ``(result, end)`` to take ``raw[start:end]`` (the result is returned), or
        None to take nothing (then None is returned).  ``receive``: when nothing at all is
        buffered, receive first, as ``next_event`` would (same bounds, same pacing).

        For lines whose common shape a caller can see at a glance (a LOGIN command, a
        back-end's one-line answers during login), framing them event by event is the dearer
        way; whatever ``accept`` declines is framed as usual by ``next_event``."""
        if self.events or not self.framer.between_lines:
            return None
        if self.raw_pos >= len(self.raw):
            if not receive:
                return None
            self._receive()
        taken = accept(self.raw, self.raw_pos)
        if taken is None:
            return None
        result, self.raw_pos = taken
        self._pace()
        return result

    # -- handing over -------------------------------------------------------------------------

    def leftover(self) -> bytes:
        """Everything received and not yet taken as an event, in stream order, and forget it:
        the bytes a relay must forward first."""
        if not self.events and self.raw_pos >= len(self.raw) and \
                getattr(self.framer, "between_lines", False):
            self.raw, self.raw_pos = b"", 0     # (kept, the last read would live on with
            return b""                          # a logged-in session's back-end reader)
        data = b"".join(e.data for e in self.events) + self.framer.pending() + \
            self.raw[self.raw_pos:]
        self.events.clear()
        self.raw, self.raw_pos = b"", 0
        return data
