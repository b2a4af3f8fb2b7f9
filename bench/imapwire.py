"""A minimal raw-socket IMAP (and POP3) client for load generation: no imaplib, no parsing beyond need.

The bench's clients must cost as little CPU as possible so the proxy, not the load generator,
is what gets measured.  Responses are read line by line; a FETCH literal is counted and
discarded in large ``recv_into`` reads without being copied.
"""
from __future__ import annotations

import socket
import ssl

RECV_SIZE = 1 << 20
MAX_LINE = 1 << 16


class ProtocolError(Exception):
    """The server said something the bench did not expect (NO, BAD, BYE, garbage)."""


def quote(text: str) -> bytes:
    """An IMAP quoted string (the bench's logins and passwords are plain ASCII)."""
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class Wire:
    """One IMAP connection: tagged commands in, raw lines out; ``close()`` is idempotent."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, source: str | None = None,
                 tls_ca: str | None = None):
        """``tls_ca``: speak TLS from the first byte (IMAPS), trusting that CA file."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_ca is not None:
            context = ssl.create_default_context(cafile=tls_ca)
            context.check_hostname = False
            self.sock = context.wrap_socket(self.sock)
        self.buffer = bytearray()
        self.sink = memoryview(bytearray(RECV_SIZE))   # FETCH literals land here
        self.tag_number = 0

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _fill(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise ProtocolError("server closed the connection")
        self.buffer += data

    def read_line(self) -> bytes:
        """The next line, CRLF included."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) > MAX_LINE:
                raise ProtocolError("response line too long")
            start = len(self.buffer)
            self._fill()

    def skip_literal(self, size: int) -> None:
        """Consume ``size`` bytes of literal payload without keeping them."""
        taken = min(size, len(self.buffer))
        del self.buffer[:taken]
        left = size - taken
        while left:
            got = self.sock.recv_into(self.sink, min(left, RECV_SIZE))
            if not got:
                raise ProtocolError("server closed the connection inside a literal")
            left -= got

    def greeting(self) -> bytes:
        line = self.read_line()
        if not line.startswith(b"* OK"):
            raise ProtocolError(f"greeting {line[:80]!r}")
        return line

    def next_tag(self) -> bytes:
        self.tag_number += 1
        return b"b%d" % self.tag_number

    def command(self, text: bytes) -> int:
        """Send one command; read to its tagged OK; return the literal bytes it carried."""
        tag = self.next_tag()
        self.sock.sendall(tag + b" " + text + b"\r\n")
        return self.await_ok(tag)

    def await_ok(self, tag: bytes, bye_expected: bool = False) -> int:
        literal_bytes = 0
        prefix = tag + b" "
        while True:
            line = self.read_line()
            if line.startswith(prefix):
                if line[len(prefix):len(prefix) + 2] != b"OK":
                    raise ProtocolError(f"{line[:120]!r}")
                return literal_bytes
            if line.endswith(b"}\r\n"):
                size = int(line[line.rindex(b"{") + 1:-3].rstrip(b"+"))
                self.skip_literal(size)
                literal_bytes += size
            elif line.startswith(b"* BYE") and not bye_expected:
                raise ProtocolError(f"{line[:120]!r}")

    def login(self, login_name: str, password: str) -> None:
        self.command(b"LOGIN " + quote(login_name) + b" " + quote(password))

    def logout(self) -> None:
        """LOGOUT, then wait for the server to close first (its side keeps the TIME_WAIT)."""
        tag = self.next_tag()
        self.sock.sendall(tag + b" LOGOUT\r\n")
        self.await_ok(tag, bye_expected=True)
        while self.sock.recv(4096):
            pass


def session(host: str, port: int, login_name: str, password: str, timeout: float = 10.0) -> None:
    """One whole short session as a mail client opens it: connect, greeting, LOGIN,
    SELECT INBOX, FETCH 1:* (FLAGS RFC822.SIZE), LOGOUT, close."""
    wire = Wire(host, port, timeout)
    try:
        wire.greeting()
        wire.login(login_name, password)
        wire.command(b"SELECT INBOX")
        wire.command(b"FETCH 1:* (FLAGS RFC822.SIZE)")
        wire.logout()
    finally:
        wire.close()


def pop3_session(host: str, port: int, login_name: str, password: str,
                 timeout: float = 10.0) -> None:
    """One whole POP3 session: connect, greeting, USER, PASS, STAT, QUIT, close."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        _pop3_ok(reader.readline(MAX_LINE))
        for command in (b"USER " + login_name.encode(), b"PASS " + password.encode(), b"STAT"):
            sock.sendall(command + b"\r\n")
            _pop3_ok(reader.readline(MAX_LINE))
        sock.sendall(b"QUIT\r\n")
        _pop3_ok(reader.readline(MAX_LINE))
        while sock.recv(4096):      # the server closes first (its side keeps the TIME_WAIT)
            pass
        reader.close()
    finally:
        sock.close()


def _pop3_ok(line: bytes) -> None:
    if not line.startswith(b"+OK"):
        raise ProtocolError(f"POP3 {line[:120]!r}")
