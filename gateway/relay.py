"""Protocol-free two-way byte pump with byte counters and an idle timeout.

Runs in the session's greenlet (client → back-end) plus one more greenlet (back-end →
client).  Data moves in bounded reads; nothing is buffered beyond one read, so a 50 MB
literal streams through in chunks.  An optional ``observe`` callback sees every chunk the
client sends (the IMAP relay tracks tags and literals with it) before it is forwarded.
"""
from __future__ import annotations

import socket
import time

import gevent

CHUNK = 65536


class RelayEnd(Exception):
    """Why a relay stopped: ``side`` ("client" or "backend") and a reason for the log."""

    def __init__(self, side: str, reason: str):
        super().__init__(f"{side} {reason}")
        self.side = side
        self.reason = reason


def relay(session, idle_timeout: float, observe=None) -> RelayEnd:
    """Move bytes both ways until one side closes, errs or the session idles out.

    Returns the RelayEnd describing which side ended it.  Counters on ``session``:
    bytes_in (client → back-end) and bytes_out (back-end → client).
    """
    client, backend = session.client, session.backend
    client.settimeout(idle_timeout)
    backend.settimeout(idle_timeout)
    upstream = gevent.getcurrent()
    downstream = gevent.spawn(_pump_down, session, idle_timeout)
    try:
        ending = _pump(session, client, backend, "client", idle_timeout, observe)
    except RelayEnd as exc:
        ending = exc
    except gevent.GreenletExit:
        ending = RelayEnd("gateway", "closed")
    if downstream.ready():
        ending = downstream.value or ending
    else:
        downstream.kill(block=True)
    del upstream
    return ending


def _pump_down(session, idle_timeout: float) -> RelayEnd:
    try:
        ending = _pump(session, session.backend, session.client, "backend", idle_timeout, None)
    except RelayEnd as exc:
        ending = exc
    session.relay_ended(ending)
    return ending


def _pump(session, src, dst, side: str, idle_timeout: float, observe) -> RelayEnd:
    """Copy src → dst until EOF; raise RelayEnd on errors and idle timeout."""
    upward = side == "client"
    while True:
        try:
            data = src.recv(CHUNK)
        except socket.timeout:
            if time.monotonic() - session.last_activity >= idle_timeout:
                raise RelayEnd(side, "idle timeout") from None
            continue
        except OSError as exc:
            raise RelayEnd(side, f"read error: {exc.strerror or exc}") from None
        if not data:
            return RelayEnd(side, "closed")
        session.last_activity = time.monotonic()
        if observe is not None:
            observe(data)
        try:
            dst.sendall(data)
        except socket.timeout:
            raise RelayEnd("backend" if upward else "client", "write timeout") from None
        except OSError as exc:
            raise RelayEnd("backend" if upward else "client",
                           f"write error: {exc.strerror or exc}") from None
        if upward:
            session.bytes_in += len(data)
        else:
            session.bytes_out += len(data)
            session.last_backend_chunk = data  # a reference: lets a protocol see a goodbye
