"""Command-aware watching of a logged-in IMAP session's byte relay.

The byte relay forwards bytes; :class:`CommandTracker` sees the client's bytes and keeps just
enough state to know where each command starts and where literals begin and end, without
copying literal payloads, so that LOGOUT is recognised (the back-end closing after it is no
failure) and CAPABILITY commands are noted.  :class:`CapabilityFilter` rewrites the back-end's
``* CAPABILITY`` answers to those commands into the list the login's ``OK [CAPABILITY]``
showed.  Sessions that need real interception (RFC 2193 referrals) use the routing relay.
"""
from __future__ import annotations

import re

from gateway.imap.backend import filter_capability_line

HEAD_KEEP = 128       # bytes of a line's start kept to read the command name
TAIL_KEEP = 32        # bytes of a line's end kept to find a literal marker
_LITERAL_AT_END = re.compile(rb"~?\{(\d{1,10})(\+|-)?\}\r?\n\Z")


class CommandTracker:
    """Follows the client's commands; ``logout`` is set once the client sends LOGOUT."""

    __slots__ = ("literal_left", "head", "tail", "continuing", "logout", "capability_tags")

    def __init__(self):
        self.literal_left = 0      # literal payload bytes still to pass
        self.head = b""            # start of the current line (bounded)
        self.tail = b""            # end of the current line seen so far (bounded)
        self.continuing = False    # the current line continues a command after a literal
        self.logout = False
        self.capability_tags: set[bytes] = set()   # CAPABILITY commands not yet answered

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
        if len(words) >= 2:
            verb = words[1].upper()
            if verb == b"LOGOUT":
                self.logout = True
            elif verb == b"CAPABILITY" and len(self.capability_tags) < 16:
                self.capability_tags.add(words[0])


MAX_CARRY = 65536     # a response line longer than this is passed on unfiltered


class CapabilityFilter:
    """The back-end → client direction: while a client's CAPABILITY command is outstanding,
    ``* CAPABILITY`` lines are rewritten to the filtered list (one list for the login's
    ``OK [CAPABILITY ...]`` and for later CAPABILITY answers: issue 9 item 7).

    Idle the rest of the time: a chunk passes untouched unless the tracker holds a
    CAPABILITY tag.  Literals in the responses are skipped while it works.  A known limit:
    it starts at a response boundary, so a FETCH literal still in flight when CAPABILITY is
    pipelined behind it is read as lines (only a line starting ``* CAPABILITY`` changes).
    """

    __slots__ = ("tracker", "keep", "carry", "literal_left")

    def __init__(self, tracker: CommandTracker, keep: tuple[str, ...] = ()):
        self.tracker = tracker
        self.keep = keep
        self.carry = b""           # an incomplete line held back while working
        self.literal_left = 0

    def idle(self) -> bool:
        """Nothing to rewrite now: the relay may move the back-end's bytes without showing
        them to the filter (splice), as long as this stays true."""
        return not self.tracker.capability_tags and not self.carry and not self.literal_left

    def __call__(self, view, size: int):
        """The bytes to send for the next ``size`` bytes of ``view`` (the same view when
        nothing changes)."""
        if self.idle():
            return view[:size]
        data, self.carry = self.carry + bytes(view[:size]), b""
        out, pos = [], 0
        while pos < len(data):
            if self.literal_left:
                step = min(self.literal_left, len(data) - pos)
                out.append(data[pos:pos + step])
                self.literal_left -= step
                pos += step
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                if len(data) - pos > MAX_CARRY or not self.tracker.capability_tags:
                    out.append(data[pos:])
                else:
                    self.carry = data[pos:]
                break
            out.append(self._line(data[pos:newline + 1]))
            pos = newline + 1
        return b"".join(out)

    def _line(self, line: bytes) -> bytes:
        if line[:13].upper() == b"* CAPABILITY ":
            return filter_capability_line(line, self.keep)
        tag = line.split(b" ", 1)[0]
        self.tracker.capability_tags.discard(tag)
        match = _LITERAL_AT_END.search(line[-TAIL_KEEP:])
        if match:
            self.literal_left = int(match.group(1))
        return line
