"""SMTP framing, pure (no sockets, no I/O, stdlib only).

Three resumable pieces, each fed whatever a read returned:

* :class:`LineFramer` cuts a stream into CRLF lines with a length bound (RFC 5321 §4.5.3.1:
  512 octets for a command line, 12288 for an AUTH line, RFC 4954 §4), dropping an over-long
  line as it arrives and reporting it once its end is seen (``TooLong``).
* :class:`ReplyFramer` groups reply lines (``250-...`` / ``250 ...``) into :class:`Reply`.
* :class:`Transactions` follows the client side of a logged-in session as the relay moves it:
  command lines, DATA content up to its ``.`` line (RFC 5321 §4.1.1.4) and BDAT chunks
  (RFC 3030), counting each message's octets and reporting the first overflow.  It keeps at
  most one command line, so a 20 MB message costs it nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MAX_COMMAND_LINE", "MAX_AUTH_LINE", "MAX_REPLY_LINE", "Line", "TooLong", "LineFramer",
           "Reply", "ReplyFramer", "ReplyError", "Transactions", "Verdict"]

MAX_COMMAND_LINE = 512     # RFC 5321 §4.5.3.1.4, CRLF included
MAX_AUTH_LINE = 12288      # RFC 4954 §4: SASL lines may be longer than commands
MAX_REPLY_LINE = 4096      # RFC 5321 §4.5.3.1.5 says 512; servers write longer EHLO lines
MAX_REPLY_LINES = 100


@dataclass(frozen=True, slots=True)
class Line:
    data: bytes       # the whole line, line end included, exactly as received

    @property
    def text(self) -> bytes:
        """The line without its CRLF (or bare LF)."""
        return self.data[:-2] if self.data.endswith(b"\r\n") else self.data[:-1]


@dataclass(frozen=True, slots=True)
class TooLong:
    """Stands in the event stream for a line longer than the bound (its bytes are gone)."""
    size: int
    data: bytes = b""     # nothing of it is kept (lets a reader join the events' data)


class LineFramer:
    """CRLF (or bare LF) lines without their line end; memory bounded by ``max_line``."""

    def __init__(self, max_line: int = MAX_COMMAND_LINE):
        self.max_line = max_line
        self.buffer = bytearray()
        self.dropped = 0          # octets of an over-long line dropped so far

    def feed(self, data: bytes) -> list[Line | TooLong]:
        """The lines completed by ``data`` (``TooLong`` for each over-long one)."""
        self.buffer += data
        events: list[Line | TooLong] = []
        while True:
            newline = self.buffer.find(b"\n")
            if newline < 0:
                if len(self.buffer) > self.max_line:
                    self.dropped += len(self.buffer)
                    self.buffer.clear()
                return events
            size = self.dropped + newline + 1
            line = bytes(self.buffer[:newline + 1])
            del self.buffer[:newline + 1]
            if self.dropped or size > self.max_line:
                self.dropped = 0
                events.append(TooLong(size))
            else:
                events.append(Line(line))

    def pending(self) -> bytes:
        """The bytes after the last complete line (handed to the relay after login)."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    take = pending


class ReplyError(ValueError):
    """A back-end reply that is not SMTP: bad code, mixed codes, too long or too many lines."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]          # the texts after "NNN-" / "NNN "
    data: bytes = b""               # the reply's bytes as received

    @property
    def kind(self) -> int:
        """1 to 5: the reply's first digit (2 success, 3 continue, 4 transient, 5 permanent)."""
        return self.code // 100

    @property
    def text(self) -> str:
        return self.lines[-1] if self.lines else ""


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.DOTALL)


class ReplyFramer:
    """Groups reply lines into replies (RFC 5321 §4.2.1)."""

    def __init__(self):
        self.lines = LineFramer(MAX_REPLY_LINE)
        self.code: int | None = None
        self.texts: list[str] = []
        self.raw: list[bytes] = []

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by ``data``; raises ReplyError on anything else."""
        replies = []
        for event in self.lines.feed(data):
            if isinstance(event, TooLong):
                raise ReplyError(f"reply line of {event.size} octets")
            line = event.text
            match = _REPLY_LINE.fullmatch(line)
            if match is None:
                raise ReplyError(f"not a reply line: {line[:80]!r}")
            code = int(match.group(1))
            if self.code is not None and code != self.code:
                raise ReplyError(f"reply code changed from {self.code} to {code}")
            self.code = code
            self.texts.append(match.group(3).decode("utf-8", "replace"))
            self.raw.append(event.data)
            if len(self.texts) > MAX_REPLY_LINES:
                raise ReplyError("reply of too many lines")
            if match.group(2) != b"-":
                replies.append(Reply(code, tuple(self.texts), b"".join(self.raw)))
                self.code, self.texts, self.raw = None, [], []
        return replies

    def pending(self) -> bytes:
        """Bytes not yet part of a complete reply (a reader hands them on)."""
        return b"".join(self.raw) + self.lines.pending()


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a logged-in client must be stopped: ``reply`` is its SMTP answer."""
    reason: str
    reply: bytes


TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
_SIZE_PARAM = re.compile(rb"\sSIZE=([0-9]{1,20})(?=\s|$)", re.IGNORECASE)
_BDAT = re.compile(rb"BDAT\s+([0-9]{1,20})(\s+LAST)?\s*", re.IGNORECASE)


class Transactions:
    """The client's side of a logged-in SMTP session, seen chunk by chunk.

    ``feed`` returns None while all is well, or the first :class:`Verdict` (a MAIL FROM
    announcing ``SIZE=`` above ``max_size``, or message content past it).  ``quit_seen`` tells
    the session that a back-end close is the answer to QUIT.  Client lines are never held:
    only the first ``MAX_COMMAND_LINE`` octets of the current command line are kept.

    DATA content is assumed to follow every DATA command (the back-end's 354 is not seen);
    after a refused DATA the next commands count as content until a ``.`` line, which can
    only make the count larger.
    """

    COMMAND, DATA, BDAT = "command", "data", "bdat"

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.mode = self.COMMAND
        self.line = bytearray()        # the current command line (bounded)
        self.line_start = True         # DATA: the next octet starts a line
        self.dot_state = 0             # DATA: 1 after "." at a line start, 2 after ".\r"
        self.chunk_left = 0            # BDAT: octets of the current chunk still to come
        self.message_size = 0          # octets of the current message so far
        self.quit_seen = False
        self.verdict: Verdict | None = None

    def feed(self, data, size: int | None = None) -> Verdict | None:
        """Follow ``data[:size]`` (bytes or bytearray, e.g. the relay's shared buffer);
        the first Verdict, once, else None."""
        if self.verdict is not None or self.quit_seen:
            return None
        end = len(data) if size is None else size
        position = 0
        # Nothing after QUIT counts: the server's answer to it ends the session.
        while position < end and self.verdict is None and not self.quit_seen:
            if self.mode == self.COMMAND:
                position = self._command(data, position, end)
            elif self.mode == self.DATA:
                position = self._data(data, position, end)
            else:
                position = self._bdat(position, end)
        return self.verdict

    # -- the three modes -------------------------------------------------------------------

    def _command(self, data, position: int, end: int) -> int:
        newline = data.find(b"\n", position, end)
        stop = end if newline < 0 else newline + 1
        room = MAX_COMMAND_LINE - len(self.line)
        if room > 0:
            self.line += data[position:min(stop, position + room)]
        if newline >= 0:
            line = bytes(self.line).rstrip(b"\r\n")
            self.line.clear()
            self._command_line(line)
        return stop

    def _command_line(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"MAIL":
            self.message_size = 0
            declared = _SIZE_PARAM.search(line)
            if declared is not None and int(declared.group(1)) > self.max_size:
                self.verdict = Verdict("declared size too big", TOO_BIG)
        elif verb == b"DATA" and line[4:].strip() == b"":
            self.mode, self.line_start, self.dot_state = self.DATA, True, 0
        elif verb == b"BDAT":
            chunk = _BDAT.fullmatch(line)
            if chunk is not None:
                self.mode, self.chunk_left = self.BDAT, int(chunk.group(1))
                if self.chunk_left == 0:
                    self.mode = self.COMMAND
        elif verb == b"QUIT" and line[4:].strip() == b"":
            self.quit_seen = True
        elif verb == b"RSET":
            self.message_size = 0

    def _data(self, data, position: int, end: int) -> int:
        """Content up to the ``.`` line; a byte at a time only around line starts."""
        while position < end:
            if self.dot_state == 0 and not self.line_start:
                newline = data.find(b"\n", position, end)
                stop = end if newline < 0 else newline + 1
                self._count(stop - position)
                self.line_start = newline >= 0
                position = stop
                if self.verdict is not None:
                    return end
                continue
            octet = data[position]
            position += 1
            if self.dot_state == 0:          # at a line start
                if octet == 0x2E:
                    self.dot_state = 1
                else:
                    self.line_start = octet == 0x0A
                    self._count(1)
            elif self.dot_state == 1 and octet == 0x0D:
                self.dot_state = 2
            elif octet == 0x0A:              # ".\n" or ".\r\n": the end of the message
                self.mode, self.dot_state, self.message_size = self.COMMAND, 0, 0
                return position
            else:                            # a dot-stuffed line (RFC 5321 §4.5.2)
                self.dot_state, self.line_start = 0, octet == 0x0A
                self._count(1)
        return position

    def _bdat(self, position: int, end: int) -> int:
        take = min(self.chunk_left, end - position)
        self.chunk_left -= take
        self._count(take)
        if self.chunk_left == 0:
            self.mode = self.COMMAND
        return position + take

    def _count(self, size: int) -> None:
        self.message_size += size
        if self.message_size > self.max_size and self.verdict is None:
            self.verdict = Verdict("message too big", TOO_BIG)

