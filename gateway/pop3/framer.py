"""POP3 line framing, pure (no sockets, no I/O): bytes in, lines out, resuming anywhere.

A POP3 command or answer line ends at LF (CRLF, or a bare LF from a sloppy peer).  A line
longer than ``max_line`` (line end included) is not kept: its bytes are dropped as they come
and, once its LF arrives, one ``TooLong`` event takes its place, so the peer's next line is
read in step (RFC 2449 §4: an over-long command is refused and the session goes on).  Memory
stays bounded by ``max_line`` whatever the peer sends.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Line", "TooLong", "LineFramer"]


@dataclass(frozen=True, slots=True)
class Line:
    data: bytes       # the whole line, line end included, exactly as received

    @property
    def text(self) -> bytes:
        """The line without its line end."""
        return self.data.rstrip(b"\r\n") if self.data.endswith(b"\n") else self.data


@dataclass(frozen=True, slots=True)
class TooLong:
    size: int         # how many bytes the dropped line had, line end included
    data: bytes = b""  # nothing of it is kept (the attribute lets a relay join event data)


class LineFramer:
    """Incremental framing; ``feed`` gives the same events for any split of the stream."""

    def __init__(self, max_line: int = 8192):
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self._partial = bytearray()
        self._dropped = 0         # bytes of an over-long line dropped so far (0 = not dropping)

    def feed(self, data: bytes) -> list[Line | TooLong]:
        """Consume ``data``; return the events it completes, in stream order."""
        events: list[Line | TooLong] = []
        pos, end = 0, len(data)
        while pos < end:
            newline = data.find(b"\n", pos)
            stop = end if newline < 0 else newline + 1
            piece = data[pos:stop]
            if self._dropped or len(self._partial) + len(piece) > self.max_line:
                self._dropped += len(self._partial) + len(piece)
                self._partial.clear()
                if newline >= 0:
                    events.append(TooLong(self._dropped))
                    self._dropped = 0
            elif newline < 0:
                self._partial += piece
            else:
                events.append(Line(bytes(self._partial) + piece if self._partial else piece))
                self._partial.clear()
            pos = stop
        return events

    @property
    def between_lines(self) -> bool:
        """The next byte fed starts a line (nothing held, no over-long line being dropped)."""
        return not (self._partial or self._dropped)

    def line_at(self, raw: bytes, start: int) -> tuple[Line, int] | None:
        """For ``StreamReader.take_raw``, between lines: the Line ``feed`` would give first
        for ``raw[start:]`` when that begins with a whole line within ``max_line``, and where
        the line ends; None (nothing taken) for anything else, which ``feed`` frames."""
        end = raw.find(b"\n", start) + 1
        if not end or end - start > self.max_line:
            return None
        return Line(raw if start == 0 and end == len(raw) else raw[start:end]), end

    def pending(self) -> bytes:
        """Bytes held waiting for a line end (nothing of a line being dropped)."""
        return bytes(self._partial)
