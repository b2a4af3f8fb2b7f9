"""gateway/relay.py: bulk data through splice(2), and the pipe a slow reader's direction holds.

Real loopback TCP sockets on the test's own gevent loop: a far back-end end writes a big
answer at once, a far client end with a small receive buffer reads it slowly, the relay sits
between them as it does in a worker.
"""
import os
import time

import gevent
import pytest
from gevent import socket

from gateway import relay as relay_mod

BIG = 6 * 1024 * 1024


class Session:
    """What a relay asks of its session (gateway/session.py's Session provides the same)."""

    def __init__(self):
        self.last_activity = time.monotonic()
        self.bytes_in = self.bytes_out = 0
        self.ended = gevent.event.Event()
        self.end = None

    def relay_ended(self, end):
        self.end = end

    def relay_closed(self):
        self.ended.set()


def _pair(rcvbuf=None):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    far = socket.socket()
    if rcvbuf:
        far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    far.connect(listener.getsockname())
    near, _ = listener.accept()
    listener.close()
    return far, near


def _payload(size):
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


def _relay(rcvbuf=16384):
    client_far, client_near = _pair(rcvbuf)
    backend_far, backend_near = _pair()
    session = Session()
    relay = relay_mod.Relay(session, client_near, backend_near)
    relay.start()
    return session, relay, client_far, backend_far


def _big_answer_read_slowly(client_far, backend_far) -> list[int]:
    """The back-end sends BIG bytes at once, the client reads them slowly: they must arrive
    whole.  Returns how many pipes were held at each of the client's reads."""
    data = _payload(BIG)
    writer = gevent.spawn(backend_far.sendall, data)
    got, held = bytearray(), []
    while len(got) < BIG:
        piece = client_far.recv(16384)
        assert piece, "the relay closed the client's side"
        got += piece
        held.append(relay_mod._held)
        gevent.sleep(0.0005)
    assert bytes(got) == data
    writer.get(timeout=10)
    return held


@pytest.fixture(autouse=True)
def fresh_pipes(monkeypatch):
    """Each test starts with no worker pipe, no spares and nothing held."""
    monkeypatch.setattr(relay_mod, "_pipe", None)
    monkeypatch.setattr(relay_mod, "_spares", [])
    monkeypatch.setattr(relay_mod, "_held", 0)
    yield
    for pipe in relay_mod._spares + ([relay_mod._pipe] if relay_mod._pipe else []):
        for fd in pipe:
            os.close(fd)


@pytest.mark.skipif(relay_mod._SPLICE is None, reason="no os.splice here")
def test_a_slow_reader_gets_every_byte_through_a_held_pipe_which_then_goes_back():
    session, relay, client_far, backend_far = _relay()
    held = _big_answer_read_slowly(client_far, backend_far)
    assert max(held) == 1                # the client was slow: a pipe was held, bytes in it
    assert relay_mod._held == 0          # and given back once the client took them
    kept = relay_mod._spares + [relay_mod._pipe]
    assert held[-1] == 0 and 1 <= len(kept) <= 2    # the worker's pipe, and a spare at most
    assert session.bytes_out == BIG
    client_far.close()
    assert session.ended.wait(5)
    assert session.end.side == "client"
    backend_far.close()


@pytest.mark.skipif(relay_mod._SPLICE is None, reason="no os.splice here")
def test_past_the_bound_what_is_left_is_copied_and_nothing_is_lost(monkeypatch):
    monkeypatch.setattr(relay_mod, "HELD_PIPES", 0)
    session, relay, client_far, backend_far = _relay()
    held = _big_answer_read_slowly(client_far, backend_far)
    assert max(held) == 0 and relay_mod._spares == []
    client_far.close()
    backend_far.close()
    assert session.ended.wait(5)


@pytest.mark.skipif(relay_mod._SPLICE is None, reason="no os.splice here")
def test_a_session_ending_while_its_pipe_is_held_closes_that_pipe():
    session, relay, client_far, backend_far = _relay(rcvbuf=4096)
    writer = gevent.spawn(backend_far.sendall, _payload(BIG))
    deadline = time.monotonic() + 10
    while relay_mod._held == 0:
        assert time.monotonic() < deadline, "no pipe was ever held"
        client_far.recv(4096)
        gevent.sleep(0.001)
    held = relay.down.held
    client_far.close()
    assert session.ended.wait(5)
    assert relay_mod._held == 0 and relay_mod._spares == []
    for fd in held:
        with pytest.raises(OSError):
            os.fstat(fd)
    backend_far.close()
    writer.kill()


def test_a_bug_in_a_relay_callback_ends_that_session_only(caplog):
    """A callback that raises (here the client-side observer, which runs once the chunk is
    sent) ends its own relay with "gateway internal error" and closes both sides; another
    relay on the loop goes on."""
    client_far, client_near = _pair()
    backend_far, backend_near = _pair()
    broken = Session()

    def observe(buffer, size):
        raise RuntimeError("a bug")

    relay_mod.Relay(broken, client_near, backend_near, observe=observe).start()
    other, _, other_client, other_backend = _relay()
    client_far.sendall(b"a NOOP\r\n")
    assert broken.ended.wait(5)
    assert (broken.end.side, broken.end.reason) == ("gateway", "internal error")
    assert client_far.recv(100) == b""
    assert backend_far.recv(100) == b"a NOOP\r\n" and backend_far.recv(100) == b""
    assert "relay error" in caplog.text
    other_client.sendall(b"b NOOP\r\n")
    assert other_backend.recv(100) == b"b NOOP\r\n"
    other_backend.sendall(b"b OK\r\n")
    assert other_client.recv(100) == b"b OK\r\n"
    assert not other.ended.is_set()
    for sock in (client_far, backend_far, other_client, other_backend):
        sock.close()
