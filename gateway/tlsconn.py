"""A TLS connection over a non-blocking gevent socket, used like that socket (gateway.tls
makes them: ``wrap_server``, ``wrap_client``, ``starttls_client``).

Imported by gateway.tls at module level, so gevent is only imported on first use.
"""
from __future__ import annotations

import socket
import time

from OpenSSL import SSL

CHUNK = 16384     # one TLS record's worth of plaintext


class TlsHandshakeError(OSError):
    """The handshake failed or timed out (the peer is closed by the caller)."""


_waits = None


def _wait_functions():
    global _waits
    if _waits is None:
        from gevent.socket import wait_read, wait_write
        _waits = (wait_read, wait_write)
    return _waits


class TlsConnection:
    """A TLS connection over a non-blocking (gevent) socket, used like that socket.

    pyOpenSSL raises WantReadError/WantWriteError where a blocking call would wait; each is
    turned into a wait on the descriptor within the timeout (``settimeout``), so the greenlet
    yields to the others.  Decrypted bytes may sit in OpenSSL's buffer with nothing left on
    the descriptor: ``pending()`` tells, and ``recv`` always serves them first.
    """

    is_tls = True
    pushback = b""      # bytes read before TLS that the reader must still get (a greeting)

    def __init__(self, connection: SSL.Connection, sock):
        self.connection = connection
        self.sock = sock
        self.timeout = sock.gettimeout()
        self._fd = sock.fileno()
        self.closed = False

    # -- waiting ----------------------------------------------------------------------------

    def _wait(self, want_write: bool, deadline: float | None) -> None:
        wait_read, wait_write = _wait_functions()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise socket.timeout("timed out")
        (wait_write if want_write else wait_read)(self._fd, remaining,
                                                  timeout_exc=socket.timeout("timed out"))

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _call(self, method, *args, deadline: float | None = None):
        """Run an SSL call to completion, waiting cooperatively on Want* (OSError on error)."""
        while True:
            try:
                return method(*args)
            except SSL.WantReadError:
                self._wait(False, deadline)
            except SSL.WantWriteError:
                self._wait(True, deadline)
            except SSL.ZeroReturnError:
                return None
            except SSL.SysCallError as exc:
                code, text = exc.args if len(exc.args) == 2 else (-1, str(exc))
                if code == -1:      # "Unexpected EOF": the peer closed without close_notify
                    return None
                raise OSError(code, text) from None
            except SSL.Error as exc:
                raise OSError(f"TLS error: {_ssl_reason(exc)}") from None

    def handshake(self, timeout: float) -> None:
        """Complete the handshake within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        try:
            done = self._call(self.connection.do_handshake, deadline=deadline)
        except socket.timeout:
            raise TlsHandshakeError("TLS handshake timed out") from None
        except OSError as exc:
            raise TlsHandshakeError(f"TLS handshake failed: {exc.strerror or exc}") from None
        if done is None and self.connection.get_peer_finished() is None:
            raise TlsHandshakeError("TLS handshake failed: connection closed")

    # -- the socket interface ---------------------------------------------------------------

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            # Plaintext cannot be peeked at in OpenSSL: read it and keep it for the next recv.
            data = self.recv(size)
            self.pushback = data + self.pushback
            return data
        if self.pushback:
            data, self.pushback = self.pushback[:size], self.pushback[size:]
            return data
        data = self._call(self.connection.recv, min(size, CHUNK) or 1, deadline=self._deadline())
        return data or b""

    def recv_into(self, buffer, size: int = 0) -> int:
        size = size or len(buffer)
        if self.pushback:
            data = self.recv(size)
            buffer[:len(data)] = data
            return len(data)
        count = self._call(self.connection.recv_into, buffer, min(size, CHUNK),
                           deadline=self._deadline())
        return count or 0

    def send(self, data) -> int:
        sent = self._call(self.connection.send, data[:CHUNK], deadline=self._deadline())
        if sent is None:
            raise BrokenPipeError(32, "TLS connection closed")
        return sent

    def sendall(self, data) -> None:
        view = memoryview(data)
        deadline = self._deadline()
        while len(view):
            sent = self._call(self.connection.send, view[:CHUNK], deadline=deadline)
            if sent is None:
                raise BrokenPipeError(32, "TLS connection closed")
            view = view[sent:]

    def take_over(self) -> "TlsConnection":
        """Own the descriptor under a new socket object, so that closing the accepted one
        (gevent's server does when the handler returns) leaves the connection open; the
        SSL object keeps working on the same descriptor number."""
        self.sock = _detached(self.sock)
        return self

    def pending(self) -> int:
        return self.connection.pending()

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def gettimeout(self) -> float | None:
        return self.timeout

    def fileno(self) -> int:
        return self._fd

    def getsockname(self):
        return self.sock.getsockname()

    def getpeername(self):
        return self.sock.getpeername()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def version(self) -> str:
        return self.connection.get_protocol_version_name()

    def session_reused(self) -> bool:
        from OpenSSL._util import lib
        return bool(lib.SSL_session_reused(self.connection._ssl))

    def close(self) -> None:
        """Send close_notify when it can leave at once, then close the socket."""
        if self.closed:
            return
        self.closed = True
        try:
            self.connection.shutdown()
        except (SSL.Error, OSError):
            pass
        self.sock.close()


def _detached(sock):
    """A new socket object of the same class owning ``sock``'s descriptor."""
    fresh = type(sock)(sock.family, sock.type, sock.proto, fileno=sock.detach())
    fresh.settimeout(None)
    return fresh


def _ssl_reason(exc: SSL.Error) -> str:
    """The last OpenSSL reason of an error ("certificate verify failed", ...)."""
    try:
        entries = exc.args[0]
        if entries and isinstance(entries, list):
            return str(entries[-1][-1])
    except (IndexError, TypeError):
        pass
    return str(exc) or exc.__class__.__name__
