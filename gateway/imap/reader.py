"""Whole IMAP commands and responses from a socket: the one literal-collecting loop.

:class:`ImapReader` is gateway.stream.StreamReader over an IMAP Framer, plus the loop that
gathers one command (or response) into the parts ``parser.parse_command`` /
``parser.parse_response`` take: lines and literal payloads, in order.  Used by the client's
pre-login dialogue, the back-end login and (after the routing split) the routing relay.

Interface, in short::

    reader = ImapReader(sock, max_line=..., max_literal=..., max_total=...)
    event = reader.next_event()                 # Line | LiteralChunk
    parts = reader.read_parts(on_literal)       # one whole command/response
    payload = reader.read_literal()             # the rest of a literal just announced
    raw = reader.leftover()                     # unconsumed bytes, for a relay

Errors: gateway.stream.ReadError subclasses (time bounds, EOF, socket errors),
parser.ParseError subclasses (framing bounds), :class:`TooLarge` (``max_total``).
"""
from __future__ import annotations

from gateway.imap import parser
from gateway.imap.parser import Line
from gateway.stream import StreamReader


class TooLarge(parser.ParseError):
    """One command's lines and literals together exceeded ``max_total`` bytes."""


class LiteralRefused(Exception):
    """``on_literal`` refused a literal; ``parts`` holds what was read, ``line`` its Line."""

    def __init__(self, parts: list[bytes], line: Line):
        super().__init__("literal refused")
        self.parts = parts
        self.line = line


class ImapReader(StreamReader):
    """A StreamReader over an IMAP Framer; ``max_total`` bounds one whole command."""

    def __init__(self, sock, max_line: int, max_literal: int | None = None,
                 max_total: int | None = None, recv_size: int = 16384, on_bytes=None):
        super().__init__(sock, parser.Framer(max_line=max_line, max_literal=max_literal),
                         recv_size, on_bytes)
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_total = max_total

    def read_parts(self, on_literal=None) -> list[bytes]:
        """The parts of one whole command or response: lines and literal payloads, in order.

        ``on_literal(line)`` is called for each Line announcing a literal, before its payload
        is read: it sends the "+" a synchronising literal waits for, and returns False to
        refuse the literal: then the rest of the command is read past (a non-synchronising
        literal is on its way) or framing restarts at the next line (a synchronising literal's
        payload will not come), and :class:`LiteralRefused` is raised.
        """
        parts: list[bytes] = []
        total = 0
        while True:
            event = self.next_event()
            if not isinstance(event, Line):
                continue       # a literal chunk outside a literal cannot happen; ignore it
            parts.append(event.data)
            total += len(event.data)
            if event.literal is None:
                return parts
            self._check_total(total + event.literal.size)
            if on_literal is not None and not on_literal(event):
                self._refused(event)
                raise LiteralRefused(parts, event)
            payload = self.read_literal()
            parts.append(payload)
            total += len(payload)

    def read_literal(self) -> bytes:
        """The payload of the literal whose marker line was just returned, collected."""
        payload = bytearray()
        while True:
            chunk = self.next_event()
            payload += chunk.data
            if chunk.last:
                return bytes(payload)

    def _check_total(self, total: int) -> None:
        if self.max_total is not None and total > self.max_total:
            raise TooLarge(f"command too large (limit {self.max_total} bytes)")

    def _refused(self, line: Line) -> None:
        while line.literal is not None:
            if not line.literal.nonsync:
                # The peer waits for "+" that will not come; framing restarts at the next line.
                self.set_max_literal(self.max_literal)
                return
            self.read_literal()          # already on its way (and bounded): read past it
            line = self.next_event()

    def set_max_literal(self, max_literal: int | None) -> None:
        """New framing bounds from the next unframed byte on (after login: literals of any
        size are streamed); call between commands only."""
        self.max_literal = max_literal
        self.framer = parser.Framer(max_line=self.max_line, max_literal=max_literal)
        self.line_at = self.framer.line_at
