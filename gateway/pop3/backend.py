"""A connection to a POP3 back-end: its answer lines (one StreamReader over the line
framer), the lines the gateway sends, its CAPA.  The login sequence is gateway.pop3.login.
"""
from __future__ import annotations

from gateway.pop3.framer import LineFramer, TooLong
from gateway.session import Failure, LoginError, Target
from gateway.stream import ReadError, StreamReader

MAX_LINE = 8192


def _block(raw: bytes, start: int, max_lines: int) -> tuple[list[bytes], int] | None:
    """read_block's framing of ``raw[start:]``: (its lines, the end of the "." line)."""
    if raw.startswith(b".\r\n", start):
        return [], start + 3
    end = raw.find(b"\r\n.\r\n", start)
    if end < 0:
        return None
    block = raw[start:end]
    pairs = block.count(b"\r\n")
    if pairs + 1 >= max_lines or block.count(b"\r") != pairs or block.count(b"\n") != pairs:
        return None
    lines = block.split(b"\r\n")
    if max(map(len, lines)) + 2 > MAX_LINE:
        return None
    return lines, end + 5


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

    def read_multiline(self, max_lines: int) -> list[bytes]:
        """The lines of a multi-line answer (after its +OK) up to its "." line, in at most
        ``max_lines`` reads: in one go when it is all there (``read_block``)."""
        lines = self.read_block(max_lines)
        return lines if lines is not None else self.read_lines(max_lines)

    def read_lines(self, max_lines: int) -> list[bytes]:
        """``read_multiline`` line by line."""
        lines = []
        for _ in range(max_lines):
            line = self.read_line()
            if line == b".":
                break
            lines.append(line)
        return lines

    def read_block(self, max_lines: int) -> list[bytes] | None:
        """The lines of a multi-line answer up to its "." line, when the whole of it is
        already received and plain (CRLF line ends, no line over MAX_LINE, the "." within
        ``max_lines`` lines): taken in one go, the lines ``read_lines`` would give (a CAPA
        list is ten lines).  None, with nothing taken, otherwise."""
        return self.reader.take_raw(lambda raw, start: _block(raw, start, max_lines))

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
        for capability in self.capabilities:        # (a loop: no generator per login)
            if capability.startswith("SASL ") and "PLAIN" in capability.split():
                return True
        return False
