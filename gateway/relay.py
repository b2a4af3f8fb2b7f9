"""Protocol-free two-way byte relay with byte counters and an idle timeout.

After login a session needs no greenlet of its own: each direction is an I/O watcher on the
worker's event loop whose callback moves what is readable, straight into the other socket.
An idle logged-in connection therefore costs two sockets and four small watchers, not two
parked greenlets, and a byte crosses the gateway without a greenlet switch.

Data moves through one buffer per worker (callbacks run to completion, so they never share
it at the same time); only what the other side cannot take at once is copied, and while it
waits the reading side is paused, so a slow reader holds at most one chunk per direction —
a 50 MB literal streams through in bounded memory.  An optional ``observe(buffer, size)``
sees every chunk the client sends before it is forwarded (the IMAP tracker); an optional
``rewrite(view, size)`` returns what to send for a chunk the back-end sent (IMAP's capability
filter: it returns the view itself while it has nothing to do, and says so with ``idle()``).

Bulk data (a big FETCH) does not pass through Python at all: once a read fills half the
buffer (``BULK``), a direction nobody needs to see (upward: no ``observe``; downward: no
``rewrite``, or one whose ``idle()`` is true at each wake-up) switches to ``splice(2)``
through one pipe per worker, socket → pipe → socket, up to ``PIPE_SIZE`` per wake-up; a
short read, or a rewrite that has work again, switches it back.  The worker's pipe is
empty between callbacks: when the other side cannot take all of it at once, the direction
keeps that pipe with what is left in it (the worker takes a spare pipe or makes a new one
for the next splice), stops reading, and splices the rest out as the other side takes it;
then the pipe goes back to the spares.  So a slow reader of a big FETCH costs no copy
through Python either.  At most ``HELD_PIPES`` pipes are held per worker (two descriptors
and up to PIPE_SIZE of kernel memory each); past that, what is left is read out into the
direction's pending bytes, as in the copying path.
"""
from __future__ import annotations

import _socket
import errno
import fcntl
import logging
import os
import time

from gevent import get_hub
from gevent._socket3 import _closedsocket
from gevent.socket import socket as _GeventSocket

from gateway.stream import is_tls

log = logging.getLogger("mailgate.relay")

CHUNK = 65536
# A read this big means bulk data: the next reads splice.  Not CHUNK itself: over loopback a
# read often ends at one segment, 65,483 bytes, and a full-buffer test kept most of a big
# FETCH in the copying path, switching back and forth.
BULK = CHUNK // 2
READ, WRITE = 1, 2
_buffer = bytearray(CHUNK)
_view = memoryview(_buffer)

PIPE_SIZE = 1 << 20        # bytes per splice wake-up (Linux's default pipe-max-size)
_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_pipe: tuple[int, int] | None = None      # made on first use, in the worker (after fork)
# Pipes directions may hold with bytes a slow reader has yet to take, and empty ones kept
# for reuse.  Few: Linux counts a pipe's whole capacity (256 pages at PIPE_SIZE) against its
# user's pipe-user-pages-soft (16384 pages by default), past which new pipes get one page;
# with 4 workers, (1 + 1 + 8) pipes each stay under it.
HELD_PIPES = 8
SPARE_PIPES = 1
_held = 0
_spares: list[tuple[int, int]] = []
# What a gevent socket wraps once the relay has taken its descriptor (gevent's own stand-in
# for a closed socket: close() does nothing, any I/O raises EBADF).
_HANDED_OVER = _closedsocket(-1, -1, -1, -1, "handed to the relay")


def _splice_pipe() -> tuple[int, int] | None:
    """The worker's pipe for splice (read end, write end), or None: splice is missing, or no
    pipe can be made now (out of descriptors: the copying path serves meanwhile)."""
    global _pipe, _SPLICE
    if _pipe is None and _SPLICE is not None:
        if _spares:
            _pipe = _spares.pop()
            return _pipe
        try:
            _pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                _SPLICE = None        # not for want of descriptors: no pipes here at all
            return None
        try:
            fcntl.fcntl(_pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass            # a smaller pipe only means more wake-ups
    return _pipe


def _hold_pipe() -> tuple[int, int] | None:
    """Take the worker's pipe, bytes and all, for a direction to splice out later; None when
    HELD_PIPES are held already."""
    global _pipe, _held
    if _held >= HELD_PIPES:
        return None
    held, _pipe = _pipe, None
    _held += 1
    return held


def _give_back(pipe: tuple[int, int], empty: bool) -> None:
    """A held pipe returns: kept as a spare when empty and there is room, else closed."""
    global _held
    _held -= 1
    if empty and len(_spares) < SPARE_PIPES:
        _spares.append(pipe)
        return
    for fd in pipe:
        os.close(fd)


class RelayEnd(Exception):
    """Why a relay stopped: ``side`` ("client", "backend" or "gateway") and a reason."""

    def __init__(self, side: str, reason: str):
        super().__init__(f"{side} {reason}")
        self.side = side
        self.reason = reason


def _raw(sock) -> _socket.socket:
    """Take the descriptor from a gevent socket into a plain non-blocking one.

    Family, type and protocol are passed on, else the socket module asks the kernel
    (getsockname + two getsockopt per socket); a gevent socket's descriptor is already
    non-blocking (gevent sets it so once), so only another kind of socket is switched.
    """
    already_non_blocking = type(sock) is _GeventSocket
    raw = _socket.socket(sock.family, sock.type, sock.proto, sock.detach())
    if not already_non_blocking:
        raw.setblocking(False)
    return raw


def _take(sock):
    """(plain non-blocking socket, its read watcher, its write watcher or None) for a relay.

    A gevent socket lends its own descriptor object and watchers: no new socket object (the
    socket module asks the kernel for its address, getsockname) and no new watchers (an fcntl
    each, and an epoll_ctl when one replaces the other on the same descriptor).  Any other
    socket is detached into a plain one with a new read watcher; its write watcher is made
    when a write is first left pending (most sessions never need one)."""
    if type(sock) is _GeventSocket:
        taken = sock._sock, sock._read_event, sock._write_event
        # The wrapper owns them no more: its close() (gevent's server closes each handled
        # socket when the handler returns) is a no-op on a closed proxy.
        sock._sock = _HANDED_OVER
        sock._read_event = sock._write_event = None
        return taken
    raw = _raw(sock)
    return raw, get_hub().loop.io(raw.fileno(), READ), None


class _Direction:
    """One way through the relay: reads ``src`` (on ``reader``), writes ``dst`` (waiting on
    ``writer`` when it cannot take a chunk at once)."""

    __slots__ = ("relay", "src", "dst", "side", "peer", "reader", "writer", "pending", "upward",
                 "splicing", "held", "held_size")

    def __init__(self, relay: "Relay", src, dst, upward: bool, reader, writer):
        self.relay = relay
        self.src, self.dst = src, dst
        self.upward = upward
        self.side, self.peer = ("client", "backend") if upward else ("backend", "client")
        self.reader = reader
        self.writer = writer
        self.pending = None
        self.splicing = False
        self.held = None          # a pipe with held_size bytes the other side has yet to take
        self.held_size = 0

    def on_readable(self) -> None:
        """The read watcher's callback, its own guard (``Relay.guard`` is one call more per
        chunk, and a command's round trip is two chunks).  The chunk is booked once it is
        sent, so that the peer has the bytes before the observer and the counters run (they
        add to every command's round trip otherwise); bytes whose write failed are not
        booked: the relay ends."""
        relay = self.relay
        try:
            if self.splicing:
                self.splice_through()
                return
            size = read_or_finish(relay, self.side, self.src.recv_into, _buffer)
            if not size:
                return
            if self.upward or relay.rewrite is None:
                data = _view[:size]
            else:
                data = relay.rewrite(_view, size)
            try:
                sent = self.dst.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                relay.finish(self.peer, f"write error: {exc.strerror or exc}")
                return
            if sent < len(data):
                self.wait_writable(memoryview(bytes(data[sent:])))
            account_read(relay, self.upward, size)   # the shared buffer: nothing wrote it since
            if size >= BULK and self.may_splice():
                self.splicing = True      # bulk data: the next reads go socket → pipe → socket
        except Exception:  # noqa: BLE001
            relay.failed()

    def may_splice(self) -> bool:
        """Nobody needs to see this direction's bytes now (and splice is there)."""
        if _SPLICE is None:
            return False
        relay = self.relay
        if self.upward:
            return relay.observe is None
        rewrite = relay.rewrite
        return rewrite is None or (hasattr(rewrite, "idle") and rewrite.idle())

    def splice_through(self) -> None:
        """Move what is readable (up to PIPE_SIZE) with splice(2): no copy through Python."""
        relay = self.relay
        pipe = _splice_pipe() if self.may_splice() else None
        if pipe is None:
            self.splicing = False
            self.on_readable()
            return
        size = read_or_finish(relay, self.side, _splice_in, self.src.fileno(), pipe[1])
        if not size:
            return
        account_read(relay, self.upward, size, seen=False)
        if size < BULK:
            self.splicing = False     # the bulk is over: small answers take the copying path
        sent = 0
        try:
            while sent < size:
                sent += _SPLICE(pipe[0], self.dst.fileno(), size - sent,
                                 flags=_SPLICE_FLAGS)
        except BlockingIOError:
            pass
        except OSError as exc:
            _drain(pipe[0], size - sent)
            relay.finish(self.peer, f"write error: {exc.strerror or exc}")
            return
        except BaseException:
            _drain(pipe[0], size - sent)    # the next session must find the pipe empty
            raise
        if sent < size:
            held = _hold_pipe()
            if held is None:
                self.wait_writable(memoryview(_drain(pipe[0], size - sent)))
            else:
                self.held, self.held_size = held, size - sent
                self.wait_writable(None)

    def wait_writable(self, pending: memoryview | None) -> None:
        """Keep what the other side could not take (``pending``, or the held pipe's bytes);
        stop reading until it has taken it."""
        self.pending = pending
        self.reader.stop()
        if self.writer is None:
            self.writer = get_hub().loop.io(self.dst.fileno(), WRITE)
        self.writer.start(self.relay.guard, self.on_writable)

    def on_writable(self) -> None:
        try:
            if self.held is not None:
                sent = _SPLICE(self.held[0], self.dst.fileno(), self.held_size,
                               flags=_SPLICE_FLAGS)
            else:
                sent = self.dst.send(self.pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self.relay.finish(self.peer, f"write error: {exc.strerror or exc}")
            return
        self.relay.session.last_activity = time.monotonic()   # a slow reader is not idle
        if self.held is not None:
            self.held_size -= sent
            if self.held_size:
                return
            held, self.held = self.held, None
            _give_back(held, empty=True)
        else:
            self.pending = self.pending[sent:]
            if len(self.pending):
                return
            self.pending = None
        self.writer.stop()
        self.reader.start(self.on_readable)

    def waiting(self) -> bool:
        """Bytes the other side has yet to take are kept (in Python or in a held pipe)."""
        return self.pending is not None or self.held is not None

    def stop(self) -> None:
        self.reader.stop()
        self.reader.close()
        if self.writer is not None:
            self.writer.stop()
            self.writer.close()
        if self.held is not None:
            held, self.held = self.held, None
            _give_back(held, empty=False)      # its bytes go nowhere: the session has ended



def _splice_in(src: int, pipe_in: int) -> int:
    return _SPLICE(src, pipe_in, PIPE_SIZE, flags=_SPLICE_FLAGS)


def read_or_finish(relay, side: str, read, *args) -> int:
    """``read(*args)``'s size, or 0: nothing to read yet, or the read ended the relay (an
    error or the peer's close, reported to ``relay.finish`` here)."""
    try:
        size = read(*args)
    except BlockingIOError:
        return 0
    except OSError as exc:
        relay.finish(side, f"read error: {exc.strerror or exc}")
        return 0
    if not size:
        relay.finish(side, "closed")
    return size


def account_read(relay, upward: bool, size: int, seen: bool = True) -> None:
    """Book ``size`` bytes just read into the shared buffer (``seen``) or moved unseen by
    splice: activity for the idle sweep, the byte counters, the client-side observer and the
    back-end's last bytes (how a relay ending knows whether a goodbye already went out).
    Shared by the plain and the TLS relay."""
    session = relay.session
    session.last_activity = time.monotonic()
    if upward:
        session.bytes_in += size
        if seen and relay.observe is not None:
            relay.observe(_buffer, size)
    else:
        session.bytes_out += size
        # Spliced bytes are never seen: a goodbye among them is not known.
        relay.tail = bytes(_view[max(0, size - 64):size]) if seen else b""

def _drain(fd: int, size: int) -> bytes:
    """Read ``size`` bytes that are in the pipe (they are: splice put them there)."""
    parts = []
    while size > 0:
        part = os.read(fd, size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def for_session(session, client, backend, observe=None, rewrite=None):
    """The relay for one session: this module's for plain sockets, gateway.tlsrelay's (the
    same callbacks, TLS-aware) when either side is a TLS connection."""
    if is_tls(client) or is_tls(backend):
        from gateway.tlsrelay import TlsRelay
        return TlsRelay(session, client, backend, observe, rewrite)
    return Relay(session, client, backend, observe, rewrite)


class Relay:
    """The relay of one logged-in session, from ``start()`` until ``finish()``.

    ``session`` provides ``last_activity``, the byte counters and ``relay_ended(RelayEnd)``,
    called once when the relay stops (before the sockets close, so the protocol may still
    say goodbye with ``send_to_client``).
    """

    __slots__ = ("session", "client", "backend", "up", "down", "observe", "rewrite", "tail",
                 "done", "finishing")

    def __init__(self, session, client, backend, observe=None, rewrite=None):
        self.session = session
        self.client, client_reader, client_writer = _take(client)
        self.backend, backend_reader, backend_writer = _take(backend)
        self.observe = observe
        self.rewrite = rewrite
        self.tail = b""          # the back-end's last bytes (did it say goodbye?)
        self.done = False
        self.finishing = False   # relay_ended() may write a goodbye: no second finish()
        self.up = _Direction(self, self.client, self.backend, True, client_reader,
                             backend_writer)
        self.down = _Direction(self, self.backend, self.client, False, backend_reader,
                               client_writer)

    def start(self) -> None:
        self.up.reader.start(self.up.on_readable)
        self.down.reader.start(self.down.on_readable)

    def guard(self, callback) -> None:
        """Run a watcher callback; a bug ends this session only, never the worker."""
        try:
            callback()
        except Exception:  # noqa: BLE001
            self.failed()

    def failed(self) -> None:
        """In a callback's ``except``: log the bug, end the session."""
        log.exception("session=%s relay error", getattr(self.session, "id", "-"))
        self.finish("gateway", "internal error")

    def send_to_client(self, data: bytes) -> None:
        """Best effort, for a goodbye line: only between chunks, never blocking."""
        if self.done or self.down.waiting():
            return
        try:
            self.client.send(data)
        except OSError:
            pass

    def finish(self, side: str, reason: str) -> None:
        """Stop both directions, let the protocol say goodbye, close both sockets."""
        if self.finishing:
            return
        self.finishing = True
        self.up.stop()
        self.down.stop()
        try:
            self.session.relay_ended(RelayEnd(side, reason))
        finally:
            self.done = True
            for sock in (self.client, self.backend):
                try:
                    sock.close()
                except OSError:
                    pass
            self.session.relay_closed()
            # No cycle left (session <-> relay <-> directions): reference counting frees the
            # session's objects now, not the cycle collector later.  A TLS direction's late
            # callback still finds its relay, ``finishing``, and returns.
            self.up = self.down = self.session = None
