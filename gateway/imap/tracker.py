"""Command-aware watching of the client → back-end stream after login.

The byte relay forwards bytes untouched; this tracker sees the same bytes and keeps just
enough state to know where each command starts and where literals begin and end, without
copying literal payloads, so that LOGOUT is recognised (the back-end closing after it is no
failure).  Sessions that need real interception (RFC 2193 referrals) use the routing relay.
"""
from __future__ import annotations

import re

HEAD_KEEP = 128       # bytes of a line's start kept to read the command name
TAIL_KEEP = 32        # bytes of a line's end kept to find a literal marker
_LITERAL_AT_END = re.compile(rb"~?\{(\d{1,10})(\+|-)?\}\r?\n\Z")


class CommandTracker:
    """Follows the client's commands; ``logout`` is set once the client sends LOGOUT."""

    __slots__ = ("literal_left", "head", "tail", "continuing", "logout")

    def __init__(self):
        self.literal_left = 0      # literal payload bytes still to pass
        self.head = b""            # start of the current line (bounded)
        self.tail = b""            # end of the current line seen so far (bounded)
        self.continuing = False    # the current line continues a command after a literal
        self.logout = False

    def observe(self, data, size: int) -> None:
        """Feed the next ``size`` bytes the client sent, from the start of ``data`` (a bytes
        or bytearray buffer that may be longer); any split of the stream gives the same."""
        pos = 0
        while pos < size:
            if self.literal_left:
                step = min(self.literal_left, size - pos)
                self.literal_left -= step
                pos += step
                continue
            newline = data.find(b"\n", pos, size)
            if newline < 0:
                self._partial(data[pos:size])
                return
            self._partial(data[pos:newline + 1])
            self._line_done()
            pos = newline + 1

    def _partial(self, piece: bytes) -> None:
        if len(self.head) < HEAD_KEEP:
            self.head += piece[:HEAD_KEEP - len(self.head)]
        self.tail = (self.tail + piece)[-TAIL_KEEP:]

    def _line_done(self) -> None:
        if not self.continuing:
            self._command_start(self.head)
        match = _LITERAL_AT_END.search(self.tail)
        if match:
            self.literal_left = int(match.group(1))
            self.continuing = True
        else:
            self.continuing = False
        self.head = self.tail = b""

    def _command_start(self, head: bytes) -> None:
        words = head.split(None, 2)
        if len(words) >= 2 and words[1].upper() == b"LOGOUT":
            self.logout = True
