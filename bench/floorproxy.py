"""The floor of mailgate's shape: the least a gevent proxy does per IMAP and POP3 login.

One process, a greenlet per connection until its login is done, then the bytes move in
event-loop callbacks on the raw descriptors (mailgate's relay, stripped).  Toward the
back-end it says what mailgate says (IMAP: ID with the client's address and LOGIN with
LITERAL+ literals, pipelined; POP3: CAPA, XCLIENT, AUTH PLAIN), so Dovecot does the same work
behind both; but no directory, no limits, no timeouts, no parsing beyond splitting the
client's line, no logs or metrics, one fixed back-end.  It is not a proxy anyone should run:
it exists so that ``python -m bench.floor`` can show how much of mailgate's cost per session
is Python and gevent themselves, and how much is mailgate.

    python -m bench.floorproxy BACKEND_HOST IMAP_PORT POP3_PORT LISTEN_IMAP LISTEN_POP3 \
        [BURN_US [PROCESSES]]

``BURN_US``: CPU time to burn per login in a busy loop, half before the back-end is
connected and half after its answer (``python -m bench.floor --burn-us``): the floor made
as dear as mailgate with no other difference, to see what a dearer proxy alone does to the
sessions/s and to the back-end's CPU on shared cores.  ``PROCESSES``: that many processes
share the listening sockets, as mailgate's workers do (``python -m bench.floor --workers``).
"""
from __future__ import annotations

import base64
import os
import socket
import sys
import time

import gevent
from gevent import get_hub
from gevent import socket as gsocket
from gevent.server import StreamServer

_buffer = bytearray(65536)
_view = memoryview(_buffer)


class _Relay:
    """Both directions as read callbacks; the first EOF or error closes both sides."""

    def __init__(self, client, backend):
        loop = get_hub().loop
        self.client = socket.socket(client.family, client.type, client.proto, client.detach())
        self.backend = socket.socket(backend.family, backend.type, backend.proto,
                                     backend.detach())
        self.client.setblocking(False)
        self.backend.setblocking(False)
        self.watchers = (loop.io(self.client.fileno(), 1), loop.io(self.backend.fileno(), 1))
        self.watchers[0].start(self.move, self.client, self.backend)
        self.watchers[1].start(self.move, self.backend, self.client)

    def move(self, src, dst) -> None:
        try:
            size = src.recv_into(_buffer)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if size:
            try:
                dst.send(_view[:size])       # small answers: one send takes them
                return
            except OSError:
                pass
        for watcher in self.watchers:
            watcher.stop()
            watcher.close()
        self.client.close()
        self.backend.close()


def _until(sock, mark: bytes, data: bytes = b"\r\n") -> bytes:
    """Read until ``mark`` is in ``data`` and it ends a line (``data`` starts with CRLF, so
    a mark "CRLF tag SP" finds the tag on the first line too)."""
    while mark not in data or not data.endswith(b"\r\n"):
        data += sock.recv(4096)
    return data


_burn_seconds = 0.0


def _burn() -> None:
    """Spend _burn_seconds of this thread's CPU time (half of BURN_US)."""
    if _burn_seconds:
        until = time.thread_time() + _burn_seconds
        while time.thread_time() < until:
            pass


def _backend(host: str, port: int):
    sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((host, port))
    return sock


def serve(backend_host: str, imap_backend: int, pop3_backend: int, imap_port: int,
          pop3_port: int, processes: int = 1) -> None:
    def imap(client, address):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"* OK floor ready\r\n")
        tag, _, user, password = client.recv(4096).split()[:4]
        user, password = user.strip(b'"'), password.strip(b'"')
        _burn()
        backend = _backend(backend_host, imap_backend)
        backend.recv(4096)
        backend.sendall(
            b'F1 ID ("x-originating-ip" "%s" "x-originating-port" "%d" "x-connected-ip" '
            b'"127.0.0.1" "x-connected-port" "%d" "x-session-ext-id" "floor" '
            b'"x-proxy-ttl" "4")\r\n%s LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n'
            % (address[0].encode(), address[1], imap_port, tag, len(user), user,
               len(password), password))
        answers = _until(backend, b"\r\n" + tag + b" ")
        client.sendall(answers[answers.index(b"\r\n" + tag + b" ") + 2:])
        _burn()
        _Relay(client, backend)

    def pop3(client, address):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"+OK floor ready\r\n")
        user = client.recv(4096).split()[1]
        client.sendall(b"+OK\r\n")
        password = client.recv(4096).split()[1]
        _burn()
        backend = _backend(backend_host, pop3_backend)
        backend.recv(4096)
        backend.sendall(b"CAPA\r\n")
        _until(backend, b"\r\n.\r\n")
        backend.sendall(b"XCLIENT ADDR=%s PORT=%d SESSION=floor\r\n"
                        % (address[0].encode(), address[1]))
        backend.recv(4096)
        backend.sendall(b"AUTH PLAIN %s\r\n"
                        % base64.b64encode(b"\0" + user + b"\0" + password))
        client.sendall(backend.recv(4096))
        _burn()
        _Relay(client, backend)

    listeners = []
    for port in (imap_port, pop3_port):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1024)
        listeners.append(listener)
    for _ in range(processes - 1):     # bound before the fork: every process accepts on them
        if os.fork() == 0:
            break
    else:
        print("ready", flush=True)
    for listener, handle in zip(listeners, (imap, pop3)):
        server = StreamServer(gsocket.socket(fileno=listener.detach()), handle)
        server.max_accept = 1
        server.start()
    gevent.wait()


if __name__ == "__main__":
    host, *ports = sys.argv[1:6]
    _burn_seconds = float(sys.argv[6]) / 2e6 if len(sys.argv) > 6 else 0.0
    serve(host, *(int(p) for p in ports), int(sys.argv[7]) if len(sys.argv) > 7 else 1)
