"""workers/sockets.py: the listening sockets the master binds for its workers."""
import socket

from workers import sockets


def test_accepted_sockets_inherit_nodelay_from_the_listener():
    """Sessions do not set TCP_NODELAY per client (gateway.session.NODELAY_INHERITED): the
    listener carries it and Linux copies it to every accepted socket."""
    listener = sockets.bind(("127.0.0.1", 0))
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with socket.create_connection(listener.getsockname(), timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()
