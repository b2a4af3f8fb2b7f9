"""The relay of a logged-in session when either side speaks TLS: event-loop callbacks, like
gateway.relay, with what TLS changes.

* A readable descriptor is not readable plaintext (half a record): WantReadError just
  waits again.  A read may also need to write (WantWriteError) and a write to read: each
  direction waits for whatever the last call asked for, on whichever descriptor.
* Decrypted bytes may wait in OpenSSL's buffer with nothing left on the descriptor
  (SSL_pending), so no I/O event would ever come for them: after a chunk, a direction whose
  source still holds plaintext schedules itself again as a loop callback (after the other
  callbacks: one chunk per turn, so a session cannot starve the worker).
* A write OpenSSL could not finish is retried with the same bytes (the pending copy).

An idle TLS session costs its two TlsConnections and a few watchers: no greenlet (two parked
greenlets measured 17 KiB more per session; ``python -m bench.tls``).  Same interface as
``gateway.relay.Relay``.
"""
from __future__ import annotations

import time

from gevent import get_hub
from OpenSSL import SSL

from gateway.relay import READ, WRITE, Relay, _buffer, _raw, _view, account_read, read_or_finish
from gateway.stream import is_tls
from gateway.tlsconn import _ssl_reason

RECORD = 16384


class _Want(Exception):
    """The call would block; ``events`` (READ or WRITE) says on what to wait."""
    events = READ


class _WantRead(_Want):
    events = READ


class _WantWrite(_Want):
    events = WRITE


class _PlainEnd:
    """A plain non-blocking socket as a relay endpoint."""

    __slots__ = ("sock",)

    def __init__(self, sock):
        self.sock = _raw(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_into(self, buffer) -> int:
        try:
            return self.sock.recv_into(buffer)
        except BlockingIOError:
            raise _WantRead from None

    def write(self, data) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            raise _WantWrite from None

    def buffered(self) -> bool:
        return False

    def try_send(self, data: bytes) -> None:
        self.sock.send(data)

    def close(self) -> None:
        self.sock.close()


class _TlsEnd:
    """A TlsConnection as a relay endpoint: its SSL object used without waiting."""

    __slots__ = ("tls", "ssl", "fd")

    def __init__(self, tls):
        self.tls = tls.take_over()      # the accepted socket object is closed by gevent
        self.ssl = tls.connection
        self.fd = tls.fileno()

    def fileno(self) -> int:
        return self.fd

    def _call(self, method, *args) -> int:
        try:
            return method(*args)
        except SSL.WantReadError:
            raise _WantRead from None
        except SSL.WantWriteError:
            raise _WantWrite from None
        except SSL.ZeroReturnError:
            return 0
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:     # EOF without close_notify
                return 0
            raise OSError(*exc.args) from None
        except SSL.Error as exc:
            raise OSError(f"TLS error: {_ssl_reason(exc)}") from None

    def read_into(self, buffer) -> int:
        # SSL_read returns at most one record (16 KiB); pyOpenSSL allocates what is asked.
        return self._call(self.ssl.recv_into, buffer, RECORD)

    def write(self, data) -> int:
        sent = self._call(self.ssl.send, data)
        if not sent:
            raise BrokenPipeError(32, "TLS connection closed")
        return sent

    def buffered(self) -> bool:
        return self.ssl.pending() > 0

    def try_send(self, data: bytes) -> None:
        self._call(self.ssl.send, data)

    def close(self) -> None:
        self.tls.close()


def _endpoint(sock):
    return _TlsEnd(sock) if is_tls(sock) else _PlainEnd(sock)


class _Direction:
    """One way through the relay: reads ``src``, writes ``dst``."""

    __slots__ = ("relay", "src", "dst", "upward", "side", "peer", "loop", "watchers",
                 "active", "pending")

    def __init__(self, relay: "TlsRelay", src, dst, upward: bool):
        self.relay = relay
        self.src, self.dst = src, dst
        self.upward = upward
        self.side, self.peer = ("client", "backend") if upward else ("backend", "client")
        self.loop = get_hub().loop
        self.watchers: dict = {}
        self.active = None
        self.pending = None

    def _wait(self, endpoint, events: int, callback) -> None:
        key = (endpoint is self.src, events)
        watcher = self.watchers.get(key)
        if watcher is None:
            watcher = self.watchers[key] = self.loop.io(endpoint.fileno(), events)
        if watcher is self.active:
            return
        if self.active is not None:
            self.active.stop()
        self.active = watcher
        watcher.start(self.relay.guard, callback)

    def start(self) -> None:
        self._wait(self.src, READ, self.on_readable)

    def on_readable(self) -> None:
        relay = self.relay
        if relay.finishing or self.pending is not None:
            return
        try:
            size = read_or_finish(relay, self.side, self.src.read_into, _buffer)
        except _Want as want:
            self._wait(self.src, want.events, self.on_readable)
            return
        if not size:
            return
        if not self.upward and relay.rewrite is not None:
            self.forward(relay.rewrite(_view, size))
        else:
            self.forward(_view[:size])
        if not relay.finishing:       # booked once sent, as in the plain relay
            account_read(relay, self.upward, size)

    def forward(self, data) -> None:
        try:
            sent = self.dst.write(data)
        except _Want as want:
            self.pending = bytes(data)
            self._wait(self.dst, want.events, self.on_writable)
            return
        except OSError as exc:
            self.relay.finish(self.peer, f"write error: {exc.strerror or exc}")
            return
        if sent < len(data):
            self.pending = bytes(data[sent:])
            self._wait(self.dst, WRITE, self.on_writable)
            return
        self.read_more()

    def on_writable(self) -> None:
        if self.relay.finishing:
            return
        data, self.pending = self.pending, None
        self.relay.session.last_activity = time.monotonic()   # a slow reader is not idle
        self.forward(data)

    def read_more(self) -> None:
        """Wait for the source again; plaintext already in OpenSSL's buffer cannot wake a
        watcher, so it is read on the loop's next turn instead."""
        self._wait(self.src, READ, self.on_readable)
        if self.src.buffered():
            self.loop.run_callback(self.relay.guard, self.on_readable)

    def stop(self) -> None:
        for watcher in self.watchers.values():
            watcher.stop()
            watcher.close()
        self.watchers.clear()
        self.active = None


class TlsRelay(Relay):
    """The relay of one logged-in session whose client or back-end connection is TLS: the
    plain relay's life cycle (``guard``, ``finish``) over TLS-aware directions."""

    __slots__ = ()

    def __init__(self, session, client, backend, observe=None, rewrite=None):
        self.session = session
        self.client = _endpoint(client)
        self.backend = _endpoint(backend)
        self.observe = observe
        self.rewrite = rewrite      # what to send for a back-end chunk (see gateway.relay)
        self.tail = b""
        self.done = False
        self.finishing = False
        self.up = _Direction(self, self.client, self.backend, True)
        self.down = _Direction(self, self.backend, self.client, False)

    def start(self) -> None:
        self.up.start()
        self.down.start()
        # Plaintext decrypted during the login phase may already wait in OpenSSL's buffer.
        for direction in (self.up, self.down):
            if direction.src.buffered():
                direction.loop.run_callback(self.guard, direction.on_readable)

    def send_to_client(self, data: bytes) -> None:
        """Best effort, for a goodbye line: only between chunks, never blocking."""
        if self.done or self.down.pending is not None:
            return
        try:
            self.client.try_send(data)
        except (OSError, _Want):
            pass
