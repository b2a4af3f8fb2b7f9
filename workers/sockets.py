"""Bind every listening socket once, in the master, so that workers inherit them.

No gevent here: the master stays an ordinary blocking process.
"""
from __future__ import annotations

import socket

BACKLOG = 1024


class BindError(Exception):
    """One line naming the address and the reason."""


def bind(address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket on (host, port), inheritable by forked children."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Every protocol here is a dialogue of short lines: no Nagle delay.  Linux copies
        # the option to each accepted socket (one setsockopt per listener, not per client).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class SocketSet:
    """The master's listening sockets, keyed by (host, port), kept across reloads."""

    def __init__(self):
        self.by_address: dict[tuple[str, int], socket.socket] = {}

    def ensure(self, addresses: list[tuple[str, int]]) -> None:
        """Bind what is new; close what is no longer configured. Raises BindError."""
        wanted = set(addresses)
        fresh = {}
        try:
            for address in addresses:
                if address not in self.by_address and address not in fresh:
                    fresh[address] = bind(address)
        except BindError:
            for sock in fresh.values():
                sock.close()
            raise
        self.by_address.update(fresh)
        for address in list(self.by_address):
            if address not in wanted:
                self.by_address.pop(address).close()

    def fds(self) -> dict[tuple[str, int], int]:
        return {address: sock.fileno() for address, sock in self.by_address.items()}

    def close(self) -> None:
        for sock in self.by_address.values():
            sock.close()
        self.by_address.clear()
