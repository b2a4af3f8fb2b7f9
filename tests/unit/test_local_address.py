"""The address a client connected to, for the back-end's ID (x-connected-ip/-port): the
listener's own when it names one IP address, else the socket's."""
from __future__ import annotations

import socket

from gateway.config import ListenConfig
from gateway.session import local_address


def test_a_listener_bound_to_one_address_needs_no_socket_call():
    class NoCalls:
        def getsockname(self):
            raise AssertionError("getsockname called")
    assert local_address(ListenConfig("imap", "127.0.0.1:1143"), NoCalls()) == ("127.0.0.1", 1143)
    assert local_address(ListenConfig("imap", "[::1]:1143"), NoCalls()) == ("::1", 1143)


def test_a_wildcard_or_named_listener_asks_the_socket():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        for address in ("0.0.0.0:993", "[::]:993", "localhost:993"):
            assert local_address(ListenConfig("imap", address), sock) == ("127.0.0.1", port)
