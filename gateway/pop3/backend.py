"""A connection to a POP3 back-end: its answer lines (one StreamReader over the line
framer), the lines the gateway sends, its CAPA.  The login sequence is gateway.pop3.login.
"""
from __future__ import annotations

from gateway.pop3.framer import LineFramer, TooLong
from gateway.session import Failure, LoginError, Target
from gateway.stream import ReadError, StreamReader

MAX_LINE = 8192


class BackendConnection:
    """One connection to a POP3 back-end; logged in after :func:`log_in`."""

    def __init__(self, sock, target: Target):
        self.sock = sock
        self.target = target
        self.name = target.config.name
        self.reader = StreamReader(sock, LineFramer(MAX_LINE))
        # (no answer_due: session.connect returns once the greeting is readable)
        self.capabilities: set[str] = set()

    def fail(self, failure: Failure, detail: str) -> LoginError:
        return LoginError(failure, f"backend {self.name}: {detail}")

    def read_line(self) -> bytes:
        """One answer line without its line end; any failure is a LoginError."""
        try:
            event = self.reader.next_event()
        except ReadError as exc:
            raise self.fail(Failure.UNAVAILABLE, str(exc)) from None
        if isinstance(event, TooLong):
            raise self.fail(Failure.PROTOCOL, "answer line too long")
        return event.text

    def send(self, line: bytes) -> None:
        try:
            self.sock.sendall(line)
        except OSError as exc:
            raise self.fail(Failure.UNAVAILABLE, f"write error: {exc.strerror or exc}") from None
        self.reader.answer_due = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def offers_plain(self) -> bool:
        return any(c.startswith("SASL ") and "PLAIN" in c.split() for c in self.capabilities)
