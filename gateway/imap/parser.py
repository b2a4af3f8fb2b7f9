"""IMAP framing and tokenising, pure (no sockets, no I/O, stdlib only).

:class:`Framer` cuts a byte stream into Line / LiteralChunk events, resuming wherever a read
stopped, so literals stream through in bounded chunks; :func:`parse_command` and
:func:`parse_response` tokenise one complete command or response.  Grammar: RFC 3501 §9 and
RFC 9051 §9; literal markers: RFC 7888 (LITERAL+/LITERAL-) and RFC 3516 (literal8 ``~{n}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ParseError", "LineTooLong", "LiteralTooLarge", "Literal", "Line", "LiteralChunk",
           "Framer", "Atom", "Command", "ResponseCode", "Response",
           "parse_command", "parse_response", "capabilities"]

MAX_LITERAL_SIZE = 2**32 - 1   # RFC 3501 §9: number = unsigned 32-bit integer
MAX_DEPTH = 32                 # nesting bound for parenthesized lists
STATUS_KINDS = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})
TAGGED_KINDS = frozenset({"OK", "NO", "BAD"})   # RFC 3501 §9 response-tagged


class ParseError(ValueError):
    """Malformed input; ``str(e)`` is a short human text usable after ``BAD ``.

    When raised by :meth:`Framer.feed`, ``e.events`` holds the events completed in that
    same call before the error (so no earlier command is lost); otherwise it is empty.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.events: list[Line | LiteralChunk] = []


class LineTooLong(ParseError):
    """A line (line end included, literals excluded) exceeded ``max_line`` bytes."""


class LiteralTooLarge(ParseError):
    """A literal marker announced more bytes than allowed; ``.literal`` is that marker."""

    def __init__(self, message: str, literal: Literal):
        super().__init__(message)
        self.literal = literal


@dataclass(frozen=True, slots=True)
class Literal:
    size: int
    nonsync: bool      # True for {n+} (RFC 7888)


@dataclass(slots=True)
class Line:
    data: bytes                 # the whole line, line end included, exactly as received
    literal: Literal | None     # marker {n} / {n+} / ~{n} right before the line end


@dataclass(slots=True)
class LiteralChunk:
    data: bytes                 # a piece of literal payload, at most Framer's `chunk` bytes
    last: bool                  # True on the final piece of this literal


def _strip_eol(line: bytes) -> bytes:
    """The line without one trailing CRLF or bare LF (some clients end lines with LF)."""
    return line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line


def _find_marker(body: bytes) -> tuple[int, int, bool] | None:
    """Locate a literal marker ending ``body`` (a line without its line end).

    Returns ``(start, size, nonsync)`` where ``start`` indexes the ``{`` (or the ``~`` of
    a literal8, RFC 3516), or None when the line does not end with a marker.  Sizes
    of more than 10 digits are returned as a value above MAX_LITERAL_SIZE.
    """
    if not body.endswith(b"}"):
        return None
    brace = body.rfind(b"{")
    if brace < 0:
        return None
    digits = body[brace + 1:-1]
    nonsync = digits.endswith(b"+")     # RFC 7888: literal = "{" number64 ["+"] "}" CRLF
    if nonsync:
        digits = digits[:-1]
    if not digits or not digits.isdigit():
        return None
    size = int(digits) if len(digits) <= 10 else max(int(digits[:100]), MAX_LITERAL_SIZE + 1)
    start = brace - 1 if brace > 0 and body[brace - 1] == 0x7E else brace   # "~{"
    return start, size, nonsync


class Framer:
    """Incremental framing of an IMAP byte stream (client commands and server responses alike).

    ``feed`` accepts any split of the stream and yields the same Lines, and per literal
    the same concatenated payload, whatever the split.  A line ends at LF (CRLF or bare
    LF); ``Line.data`` keeps the line end.  After a Line whose ``literal`` is set, exactly
    ``literal.size`` payload bytes follow as LiteralChunk events (one empty chunk for a
    zero-size literal), then framing resumes with the command's continuation line.

    Limits: a line whose bytes (line end included) exceed ``max_line`` raises LineTooLong,
    as soon as the buffered part proves it; a marker above ``max_literal`` raises
    LiteralTooLarge when its line completes (that Line is not returned), and a marker above
    2**32-1 with no ``max_literal`` raises ParseError("literal too large").

    After LineTooLong, or an oversize *non-synchronizing* literal, the stream cannot be
    resynchronised (the peer is already sending the payload, which must never be read as
    commands: RFC 7888 leaves discarding it or closing), so every later ``feed`` raises the
    same error: answer BAD/BYE and close.  After an oversize *synchronizing*
    literal the client waits for "+" (RFC 3501 §7.5), so framing resumes after the line:
    the rest of the failed call's input is kept and processed by the next ``feed``
    (``feed(b"")`` is enough).
    """

    def __init__(self, max_line: int = 8192, max_literal: int | None = None, chunk: int = 65536):
        if max_line < 1 or chunk < 1 or (max_literal is not None and max_literal < 0):
            raise ValueError("max_line and chunk must be positive, max_literal not negative")
        self._max_line = max_line
        self._max_literal = max_literal
        self._chunk = chunk
        self._partial = bytearray()      # bytes of the current line, no LF among them
        self._remaining = 0              # literal payload bytes still expected
        self._pending = b""              # input left over when a recoverable error stopped feed
        self._fatal: ParseError | None = None

    @property
    def in_literal(self) -> int:
        """Bytes of literal payload still expected (0 when between lines)."""
        return self._remaining

    def buffered(self) -> int:
        """Bytes held waiting for a line end."""
        return len(self._partial) + len(self._pending)

    @property
    def between_lines(self) -> bool:
        """The next byte fed starts a line: nothing held, no literal payload expected and
        no error that stops the stream (a reader may then frame a plain line itself)."""
        return not (self._partial or self._pending or self._remaining or self._fatal)

    def line_at(self, raw: bytes, start: int) -> tuple[Line, int] | None:
        """For ``StreamReader.take_raw``, between lines: the Line ``feed`` would give first
        for ``raw[start:]`` when that begins with a whole line within ``max_line`` that
        announces no literal (a LOGIN command, a back-end's answers during a login), and
        where the line ends; None (nothing taken) for anything else, which ``feed`` frames."""
        end = raw.find(b"\n", start) + 1
        if not end or end - start > self._max_line:
            return None
        body_end = end - 2 if raw[end - 2:end - 1] == b"\r" else end - 1
        if raw[body_end - 1:body_end] == b"}":       # a literal marker, maybe: feed's work
            return None
        return Line(raw if start == 0 and end == len(raw) else raw[start:end], None), end

    def pending(self) -> bytes:
        """The held bytes themselves (``buffered()`` of them), in stream order: with the data
        of every event returned so far, exactly the bytes fed.  For a hand-over to a plain
        byte relay (after login) or a STARTTLS check (nothing may follow the command)."""
        return bytes(self._partial) + self._pending

    def feed(self, data: bytes) -> list[Line | LiteralChunk]:
        """Consume ``data``; return the events it completes, in stream order.

        Raises ParseError (or a subclass) as described in the class docstring; the
        exception's ``events`` attribute holds the events completed before the error.
        """
        if self._fatal is not None:
            raise _fresh(self._fatal)
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._pending:
            data, self._pending = self._pending + data, b""
        events: list[Line | LiteralChunk] = []
        pos, end = 0, len(data)
        try:
            while pos < end:
                if self._remaining:
                    pos = self._take_literal(data, pos, events)
                else:
                    pos = self._take_line(data, pos, events)
        except ParseError as exc:
            exc.events = events
            raise
        return events

    def _take_literal(self, data: bytes, pos: int, events: list) -> int:
        size = min(self._remaining, len(data) - pos, self._chunk)
        piece = data if pos == 0 and size == len(data) else data[pos:pos + size]   # one copy at most
        self._remaining -= size
        events.append(LiteralChunk(piece, self._remaining == 0))
        return pos + size

    def _take_line(self, data: bytes, pos: int, events: list) -> int:
        newline = data.find(b"\n", pos)      # only new bytes are scanned: O(n) over the stream
        stop = len(data) if newline < 0 else newline + 1
        length = len(self._partial) + stop - pos
        # Without a line end yet, `length` bytes already mean at least length+1 in the line.
        if length > self._max_line or (newline < 0 and length >= self._max_line):
            self._fatal = LineTooLong(f"line too long (limit {self._max_line} bytes)")
            raise _fresh(self._fatal)
        if newline < 0:
            self._partial += data[pos:]
            return stop
        line = bytes(self._partial) + data[pos:stop] if self._partial else data[pos:stop]
        self._partial.clear()
        literal = self._check_literal(line, data, stop)
        events.append(Line(line, literal))
        if literal is not None:
            self._remaining = literal.size
            if literal.size == 0:
                events.append(LiteralChunk(b"", True))
        return stop

    def _check_literal(self, line: bytes, data: bytes, stop: int) -> Literal | None:
        """The line's literal marker, or raise if it announces too much (see class doc)."""
        marker = _find_marker(_strip_eol(line))
        if marker is None:
            return None
        literal = Literal(marker[1], marker[2])
        if self._max_literal is not None and literal.size > self._max_literal:
            error: ParseError = LiteralTooLarge(
                f"literal too large (limit {self._max_literal} bytes)", literal)
        elif literal.size > MAX_LITERAL_SIZE:
            error = ParseError("literal too large")
        else:
            return literal
        if literal.nonsync:
            self._fatal = error
        else:
            self._pending = data[stop:]
        raise error


def _fresh(error: ParseError) -> ParseError:
    """A new exception like ``error`` (re-raising one instance would pile up tracebacks)."""
    if isinstance(error, LiteralTooLarge):
        return LiteralTooLarge(str(error), error.literal)
    return type(error)(str(error))


# ---------------------------------------------------------------------------- tokenizer

class Atom(str):
    """An IMAP atom (includes NIL, flags like \\Seen, and fetch-att like
    BODY[HEADER.FIELDS (A B)] kept whole)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


@dataclass(frozen=True, slots=True)
class Command:
    tag: str
    name: str            # upper-cased command name ("UID FETCH" is name "UID", args[0] Atom("FETCH"))
    args: list           # Atom | bytes (quoted, unescaped, or literal payload) | list (nested)


@dataclass(frozen=True, slots=True)
class ResponseCode:
    name: str            # upper-cased, e.g. "CAPABILITY", "REFERRAL"
    text: str            # the rest inside the brackets after the name, stripped ("" if none)


@dataclass(frozen=True, slots=True)
class Response:
    tag: str             # "*", "+" or the command's tag
    kind: str            # "OK".."PREAUTH", a data keyword ("CAPABILITY", "EXISTS"...), or "+"
    code: ResponseCode | None
    text: str            # status: human text after the code; data: raw rest of the first line
    number: int | None = None
    args: list | None = None   # data responses only: tokenised rest (same types as Command.args)


# RFC 3501 §9: ATOM-CHAR = any CHAR except atom-specials ( "(" ")" "{" SP CTL
# list-wildcards quoted-specials resp-specials ).  The atom *run* below is liberal on
# purpose ("\", "*", "%", "]" allowed: flags, LIST patterns, sections); "[" opens a
# section scanned separately.  8-bit bytes are refused outside quoted strings.
_ATOM_RUN = re.compile(rb'[^\x00-\x20\x7f-\xff(){"\[]+')
_PLAIN_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){"\[\]%*\\]+')   # strict ATOM-CHAR
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')            # ASTRING-CHAR minus "+"
# quoted = DQUOTE *QUOTED-CHAR DQUOTE; QUOTED-CHAR excludes CR, LF (and NUL, RFC 9051).
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_UNESCAPE = re.compile(rb'\\(["\\])')
_LIT, _END = -1, -2     # Reader.peek() results besides a byte value


class _Reader:
    """A cursor over a command's text segments, with a literal payload between segments."""

    __slots__ = ("texts", "lits", "i", "pos")

    def __init__(self, parts: list[bytes]):
        parts = [bytes(p) for p in parts]
        if not parts or len(parts) % 2 == 0:
            raise ParseError("incomplete command: literal without continuation line")
        self.texts: list[bytes] = []
        self.lits: list[bytes] = parts[1::2]
        for k in range(0, len(parts), 2):
            body = _strip_eol(parts[k])
            marker = _find_marker(body)
            if k + 1 == len(parts):
                if marker is not None:
                    raise ParseError("missing literal payload")
                self.texts.append(body)
                continue
            if marker is None:
                raise ParseError("literal payload without a {n} marker")
            if marker[1] > MAX_LITERAL_SIZE:
                raise ParseError("literal too large")
            if marker[1] != len(parts[k + 1]):
                raise ParseError("literal size does not match its payload")
            self.texts.append(body[:marker[0]])
        self.i = self.pos = 0

    def peek(self) -> int:
        seg = self.texts[self.i]
        if self.pos < len(seg):
            return seg[self.pos]
        return _LIT if self.i < len(self.lits) else _END

    def skip_spaces(self) -> None:
        seg = self.texts[self.i]
        while self.pos < len(seg) and seg[self.pos] == 0x20:
            self.pos += 1

    def take_literal(self) -> bytes:
        payload = self.lits[self.i]
        self.i += 1
        self.pos = 0
        return payload

    def take_quoted(self) -> bytes:
        seg = self.texts[self.i]
        match = _QUOTED.match(seg, self.pos)
        if match is None:
            raise ParseError(_quoted_error(seg, self.pos))
        self.pos = match.end()
        text = match.group(1)
        return _UNESCAPE.sub(rb"\1", text) if b"\\" in text else text

    def take_atom(self) -> Atom:
        seg, start = self.texts[self.i], self.pos
        pos = start
        while True:
            match = _ATOM_RUN.match(seg, pos)
            if match is not None:
                pos = match.end()
            if pos < len(seg) and seg[pos] == 0x5B:     # "[": section-spec, RFC 3501 §6.4.5
                pos = _section_end(seg, pos)
                continue
            break
        if pos == start:
            raise ParseError(f"unexpected character {chr(seg[pos])!r}" if pos < len(seg)
                             else "unexpected literal")
        self.pos = pos
        return Atom(seg[start:pos].decode("ascii"))


def _quoted_error(seg: bytes, pos: int) -> str:  # only on failure, to say why
    """Why the quoted string at ``seg[pos]`` does not match RFC 3501 §9 ``quoted``."""
    i = pos + 1
    while i < len(seg):
        byte = seg[i]
        if byte == 0x5C:
            if i + 1 < len(seg) and seg[i + 1] in b'"\\':
                i += 2
                continue
            return "bad escape in quoted string"
        if byte in b"\r\n\x00":
            return "bad character in quoted string"
        i += 1
    return "unterminated quoted string"


def _section_end(seg: bytes, pos: int) -> int:
    """Index just past the "]" closing the section at ``seg[pos]``; quoted strings inside
    (header field names are astrings, RFC 3501 §9 header-list) may hold "]"."""
    i = pos + 1
    while i < len(seg):
        byte = seg[i]
        if byte == 0x5D:
            return i + 1
        if byte == 0x22:
            match = _QUOTED.match(seg, i)
            if match is None:
                raise ParseError(_quoted_error(seg, i))
            i = match.end()
            continue
        if byte < 0x20 or byte > 0x7E:
            raise ParseError("bad character in section")
        i += 1
    raise ParseError("unterminated '['")


def _tokenize(reader: _Reader, max_args: int) -> list:
    """Tokens from the reader's position to the end (RFC 3501 §9 astring / list / string)."""
    root: list = []
    stack = [root]
    count = 0
    while True:
        reader.skip_spaces()
        char = reader.peek()
        if char == _END:
            break
        if char == 0x28:                                    # "("
            reader.pos += 1
            if len(stack) > MAX_DEPTH:
                raise ParseError("lists nested too deeply")
            token: object = []
            stack[-1].append(token)
            stack.append(token)                             # type: ignore[arg-type]
        elif char == 0x29:                                  # ")"
            if len(stack) == 1:
                raise ParseError("unbalanced ')'")
            reader.pos += 1
            stack.pop()
            _expect_separator(reader)
            continue
        else:
            token = (reader.take_quoted() if char == 0x22 else
                     reader.take_literal() if char == _LIT else reader.take_atom())
            stack[-1].append(token)
            _expect_separator(reader)
        count += 1
        if count > max_args:
            raise ParseError(f"too many arguments (limit {max_args})")
    if len(stack) > 1:
        raise ParseError("unbalanced '('")
    return root


def _expect_separator(reader: _Reader) -> None:
    # RFC 3501 §9: tokens are separated by SP; a list's ")" or the line end may follow.
    if reader.peek() not in (0x20, 0x29, _END):
        raise ParseError("missing space between arguments")


def _head(reader: _Reader, pattern: re.Pattern, what: str) -> str:
    """Match ``pattern`` at the reader position in the first line, then SP or line end."""
    seg = reader.texts[reader.i]
    match = pattern.match(seg, reader.pos)
    if match is None:
        raise ParseError(f"missing {what}")
    reader.pos = match.end()
    following = reader.peek()
    if following == 0x20:
        reader.pos += 1
    elif following != _END:
        raise ParseError(f"bad {what}")
    return match.group().decode("ascii")


def parse_command(parts: list[bytes], max_args: int = 64) -> Command:
    """Tokenise one client command (RFC 3501 §9 ``command``).

    ``parts`` = [line0, literal0, line1, literal1, ..., lineN]: the Line.data values (line
    ends and trailing {n} markers included) and the whole payload of each literal.  Each
    marker must announce its payload's exact size.  More than ``max_args`` tokens (lists
    and their members counted recursively), a bad tag, a missing command name, bad
    quoting, unbalanced or too deep lists: ParseError.
    """
    if len(parts) == 1:
        command = _simple_command(parts[0], max_args)
        if command is not None:
            return command
    reader = _Reader(parts)
    tag = _head(reader, _TAG, "tag")
    name = _head(reader, _PLAIN_ATOM, "command name").upper()
    return Command(tag, name, _tokenize(reader, max_args))


# A command of one line whose arguments are strict atoms and quoted strings without escapes,
# one space apart (a client's LOGIN, SELECT, NOOP...): what the whole parse makes of it, read
# by two regular expressions (tests/unit/test_imap_parser.py checks the two agree).
_SIMPLE_ARG = rb'(?:(' + _PLAIN_ATOM.pattern + rb')|"([^"\\\r\n\x00]*)")'
_SIMPLE_COMMAND = re.compile(rb"(" + _TAG.pattern + rb") (" + _PLAIN_ATOM.pattern +
                             rb")((?: " + _SIMPLE_ARG + rb")*)(?:\r?\n)?\Z")
_SIMPLE_ARGS = re.compile(rb" " + _SIMPLE_ARG)


def _simple_command(line, max_args: int) -> Command | None:
    """parse_command's result for a simple one-line command, or None (take the whole way)."""
    match = _SIMPLE_COMMAND.match(line if type(line) is bytes else bytes(line))
    if match is None:
        return None
    # (findall gives b"" for the alternative that did not match; an atom is never empty)
    args = [Atom(atom.decode("ascii")) if atom else quoted
            for atom, quoted in _SIMPLE_ARGS.findall(match.group(3))]
    if len(args) > max_args:
        return None
    return Command(match.group(1).decode("ascii"), match.group(2).decode("ascii").upper(), args)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _no_literal(reader: _Reader) -> None:
    if reader.lits:     # resp-text is TEXT-CHARs only (RFC 3501 §9): no literal may occur
        raise ParseError("unexpected literal in response text")


def _code_end(rest: bytes) -> int:
    """Index of the "]" closing the code opened at ``rest[0]`` (quoted strings skipped), or -1."""
    close = rest.find(b"]", 1)
    if close < 0 or rest.find(b'"', 1, close) < 0:
        return close        # the common case (a capability list): no quoted string inside
    i, in_quote = 1, False
    while i < len(rest):
        byte = rest[i]
        if in_quote and byte == 0x5C:
            i += 2
            continue
        if byte == 0x22:
            in_quote = not in_quote
        elif byte == 0x5D and not in_quote:
            return i
        i += 1
    return -1


def _split_code(rest: bytes) -> tuple[ResponseCode | None, str]:
    """Split ``resp-text`` (RFC 3501 §9) into its ``[code]``, if any, and the human text.

    A "[" without a closing "]" or a valid code name is left as free text (text is free)."""
    if rest.startswith(b"["):
        close = _code_end(rest)
        if close > 0:
            name, _, arg = rest[1:close].partition(b" ")
            if _PLAIN_ATOM.fullmatch(name):
                code = ResponseCode(name.decode("ascii").upper(), _decode(arg).strip())
                return code, _decode(rest[close + 1:]).strip(" ")
    return None, _decode(rest).strip(" ")


def parse_response(parts: list[bytes]) -> Response:
    """Parse one server response (RFC 3501 §9 ``response``), same ``parts`` as parse_command.

    Status responses ("* OK", "tag NO", "* BYE", "* PREAUTH") and "+" continuations get a
    code and text, args None; they must be a single line.  Tagged responses must be
    OK/NO/BAD.  Untagged data ("* CAPABILITY ...", "* 5 EXISTS", "* 1 FETCH (...)") get
    their tokenised args (ParseError if those do not tokenise), and the raw rest of the
    first line as text.

    A one-line status response (every answer of a back-end login) is read by one regular
    expression; anything else, or anything it is unsure of, goes the whole way
    (``_parse_response``): the same result either way (tests/unit/test_imap_parser.py).
    """
    first = _strip_eol(bytes(parts[0])) if parts else b""
    if len(parts) == 1:
        head = _STATUS_HEAD.match(first)
        if head is not None and not first.endswith(b"}"):     # (a "}" may end a marker)
            tag, kind = head.group(1).decode("ascii"), head.group(2).decode("ascii").upper()
            if tag == "*" or kind in TAGGED_KINDS:
                code, text = _split_code(first[head.end():])
                return Response(tag, kind, code, text)
    return _parse_response(parts, first)


# "* " or a tag, SP, a status keyword, then SP or the end (as _head reads them).
_STATUS_HEAD = re.compile(rb"(\*|" + _TAG.pattern + rb") ((?i:OK|NO|BAD|BYE|PREAUTH))(?: |\Z)")


def _parse_response(parts: list[bytes], first: bytes | None = None) -> Response:
    reader = _Reader(parts)
    if first is None:
        first = _strip_eol(bytes(parts[0]))     # reader.texts[0] is a prefix of it
    if first.startswith(b"+"):                      # RFC 3501 §7.5 continue-req
        _no_literal(reader)
        rest = first[2:] if first.startswith(b"+ ") else first[1:]
        code, text = _split_code(rest)
        return Response("+", "+", code, text)
    if first.startswith(b"* "):                     # response-data / response-fatal
        tag, reader.pos = "*", 2
    else:
        tag = _head(reader, _TAG, "tag")
    kind = _head(reader, _PLAIN_ATOM, "response keyword").upper()
    number = None
    if kind.isdigit() and tag == "*":               # message-data: nz-number SP keyword
        if len(kind) > 10:
            raise ParseError("number too large")
        number = int(kind)
        kind = _head(reader, _PLAIN_ATOM, "response keyword").upper()
    rest = first[reader.pos:]
    if number is None and kind in STATUS_KINDS:
        if tag != "*" and kind not in TAGGED_KINDS:
            raise ParseError("tagged response must be OK, NO or BAD")
        _no_literal(reader)
        code, text = _split_code(rest)
        return Response(tag, kind, code, text)
    if tag != "*":
        raise ParseError("tagged response must be OK, NO or BAD")
    return Response(tag, kind, None, _decode(rest), number, _tokenize(reader, 1 << 30))


def capabilities(resp_or_code_text: str) -> list[str]:
    """Upper-cased capability names from a CAPABILITY response's or code's text
    ("IMAP4rev1 LITERAL+ AUTH=PLAIN" -> ["IMAP4REV1", "LITERAL+", "AUTH=PLAIN"])."""
    return [name.upper() for name in resp_or_code_text.split()]
