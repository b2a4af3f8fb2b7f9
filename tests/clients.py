"""Byte-level test clients for what imaplib and poplib will not send: literals, SASL-IR,
pipelining, junk.  They read CRLF lines with a timeout, so no test can hang on them."""
from __future__ import annotations

import socket
import time


def unique_message(marker: str, size: int = 0) -> bytes:
    """A message whose Subject is ``marker``, with a body of about ``size`` bytes."""
    body = (b"x" * 76 + b"\r\n") * (size // 78) if size else b"hello\r\n"
    return (f"From: test@example.com\r\nTo: someone@example.com\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@test>\r\n\r\n").encode() + body


def data_segments_in(sock: socket.socket) -> int:
    """Segments with data ``sock`` has received (Linux tcp_info.tcpi_data_segs_in): how many
    writes of the peer reached it, when the peer sends with TCP_NODELAY."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 192)
    return int.from_bytes(info[152:156], "little")


class LineClient:
    """Connects, reads the greeting line; ``line()`` returns one line without its CRLF."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


class ImapRaw(LineClient):
    def until_tagged(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged answer for ``tag``."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines


class Pop3Raw(LineClient):
    def multiline(self) -> list[bytes]:
        """A status line and, after +OK, the lines up to the terminating "."."""
        lines = [self.line()]
        while lines[0].startswith(b"+OK") and lines[-1] != b".":
            lines.append(self.line())
        return lines


def converse(port: int, commands: bytes, last_tag: bytes, timeout: float = 15) -> bytes:
    """Send pipelined ``commands`` after the greeting; everything answered up to
    ``last_tag``'s OK (or until the server closes or ``timeout`` passes), greeting excluded."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        raw.recv(4096)
        raw.sendall(commands)
        data, deadline = b"", time.monotonic() + timeout
        while b"\r\n" + last_tag + b" OK" not in data and time.monotonic() < deadline:
            chunk = raw.recv(65536)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        raw.close()


def wait_for_exists(client, timeout: float = 15) -> list:
    """IMAPClient in IDLE: the EXISTS responses seen before ``timeout`` (empty if none)."""
    seen, deadline = [], time.monotonic() + timeout
    while not seen and time.monotonic() < deadline:
        seen = [r for r in client.idle_check(timeout=1) if b"EXISTS" in r]
    return seen
