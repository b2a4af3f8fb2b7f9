"""At start, tell the operator which configured back-ends cannot be reached.

A newcomer on a fresh machine otherwise only sees ``NO [UNAVAILABLE]`` at login.  The
master opens one non-blocking TCP connection per back-end port it will use and polls them
from its main loop, so the start is never held up: one log line per unreachable back-end,
nothing for the others.  No gevent here (the master stays unpatched).
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time

log = logging.getLogger("mailgate.master")

TIMEOUT = 3.0


class BackendProbe:
    """``BackendProbe(config)`` starts the connects; call ``poll()`` until ``done``."""

    def __init__(self, config, timeout: float = TIMEOUT):
        self.deadline = time.monotonic() + timeout
        self.pending: dict[socket.socket, tuple[str, str]] = {}   # sock → (backend, what)
        self.failures: dict[str, list[str]] = {}
        self.open: dict[str, int] = {}
        protocols = {l.protocol for l in config.listen} & {"imap", "pop3"}
        for name, backend in config.backends.items():
            for protocol in sorted(protocols):
                self._start(name, backend.address, backend.port(protocol), protocol)
        self._report_finished()

    @property
    def done(self) -> bool:
        return not self.pending

    def _start(self, name: str, host: str, port: int, protocol: str) -> None:
        what = f"{protocol} {host}:{port}"
        self.open[name] = self.open.get(name, 0) + 1
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            self._fail(name, what, exc.strerror or str(exc))
            return
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code in (0, errno.EINPROGRESS):
            self.pending[sock] = (name, what)
        else:
            sock.close()
            self._fail(name, what, os.strerror(code))

    def _fail(self, name: str, what: str, reason: str) -> None:
        self.failures.setdefault(name, []).append(f"{what}: {reason}")
        self._finish(name)

    def _finish(self, name: str) -> None:
        self.open[name] -= 1

    def poll(self) -> None:
        """Collect finished connects (without waiting) and log what is known."""
        if not self.pending:
            return
        _, writable, _ = select.select([], list(self.pending), [], 0)
        for sock in writable:
            name, what = self.pending.pop(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            sock.close()
            if code:
                self._fail(name, what, os.strerror(code))
            else:
                self._finish(name)
        if time.monotonic() > self.deadline:
            for sock, (name, what) in list(self.pending.items()):
                sock.close()
                self._fail(name, what, f"no answer within {TIMEOUT:g}s")
            self.pending.clear()
        self._report_finished()

    def _report_finished(self) -> None:
        for name, count in list(self.open.items()):
            if count == 0:
                del self.open[name]
                if name in self.failures:
                    log.warning("backend %s is unreachable (%s); logins routed there will get "
                                "NO [UNAVAILABLE] / -ERR [SYS/TEMP] until it answers",
                                name, "; ".join(self.failures.pop(name)))

    def close(self) -> None:
        for sock in self.pending:
            sock.close()
        self.pending.clear()
