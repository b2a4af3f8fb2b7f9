"""Tables of IMAP streams replayed whole, line by line, byte by byte and in random chunks,
plus hypothesis on arbitrary bytes, for gateway.imap.parser."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.imap.parser import (
    Atom, Command, Framer, Line, LineTooLong, Literal, LiteralChunk, LiteralTooLarge,
    ParseError, Response, ResponseCode, capabilities, parse_command, parse_response,
)

from helpers import SPLIT_MODES as MODES, split

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def normalize(events: list, chunk: int) -> list[tuple]:
    """Lines as they are; each literal's chunks merged into one ("literal", payload).

    Also checks the chunk contract: never above `chunk` bytes, `last` only on the final piece.
    """
    out: list[tuple] = []
    payload: bytearray | None = None
    for event in events:
        if isinstance(event, Line):
            assert payload is None, "a line arrived inside a literal"
            out.append(("line", event.data, event.literal))
            continue
        assert isinstance(event, LiteralChunk) and len(event.data) <= chunk
        payload = (payload or bytearray()) + event.data
        if event.last:
            out.append(("literal", bytes(payload)))
            payload = None
    if payload is not None:
        out.append(("partial", bytes(payload)))
    return out


def replay(pieces: list[bytes], chunk: int = 5, **limits) -> tuple[list[tuple], object]:
    """Feed the pieces; return (normalized events, (error type, text) or None)."""
    framer = Framer(chunk=chunk, **limits)
    events: list = []
    for piece in pieces:
        try:
            events += framer.feed(piece)
        except ParseError as exc:
            return normalize(events + exc.events, chunk), (type(exc), str(exc))
    return normalize(events, chunk), None


def messages(stream: bytes, mode: str, **limits) -> list[list[bytes]]:
    """Frame the stream and group it into `parts` lists (line, literal, line, ...)."""
    events, error = replay(split(stream, mode), **limits)
    assert error is None, error
    grouped, parts = [], []
    for event in events:
        parts.append(event[1])
        if event[0] == "line" and event[2] is None:
            grouped.append(parts)
            parts = []
    assert not parts, "stream ends inside a command"
    return grouped


def shape(value):
    """Tokens with their types made visible (Atom == str would hide a wrong type)."""
    if isinstance(value, (Command, Response)):
        return (type(value).__name__, *(shape(getattr(value, f)) for f in value.__slots__))
    if isinstance(value, list):
        return [shape(item) for item in value]
    return (type(value).__name__, value)


# ------------------------------------------------------------------------------ framer

def L(data: bytes, size: int | None = None, nonsync: bool = False) -> tuple:
    return ("line", data, None if size is None else Literal(size, nonsync))


def P(payload: bytes) -> tuple:
    return ("literal", payload)


FRAMER_CASES = {
    "two lines": (b"a1 NOOP\r\na2 CAPABILITY\r\n", {},
                  [L(b"a1 NOOP\r\n"), L(b"a2 CAPABILITY\r\n")]),
    "bare LF": (b"a1 NOOP\na2 LOGOUT\r\n", {}, [L(b"a1 NOOP\n"), L(b"a2 LOGOUT\r\n")]),
    "lone CR stays in line": (b"a1 X\ry\r\n", {}, [L(b"a1 X\ry\r\n")]),
    "empty line": (b"\r\n", {}, [L(b"\r\n")]),
    "sync literal": (b"a1 LOGIN {4}\r\nuser {6}\r\nsecret\r\n", {},
                     [L(b"a1 LOGIN {4}\r\n", 4), P(b"user"), L(b" {6}\r\n", 6), P(b"secret"),
                      L(b"\r\n")]),
    "nonsync literal": (b"a1 LOGIN {4+}\r\nuser x\r\n", {},
                        [L(b"a1 LOGIN {4+}\r\n", 4, True), P(b"user"), L(b" x\r\n")]),
    "literal8": (b"a1 APPEND B ~{3}\r\n\x00\x01\x02\r\n", {},
                 [L(b"a1 APPEND B ~{3}\r\n", 3), P(b"\x00\x01\x02"), L(b"\r\n")]),
    "zero literal": (b"a1 LOGIN {0}\r\n {0}\n\r\n", {},
                     [L(b"a1 LOGIN {0}\r\n", 0), P(b""), L(b" {0}\n", 0), P(b""), L(b"\r\n")]),
    "literal holds CRLF and braces": (b"a {12}\r\nx\r\n{3}\r\n\r\nyz\r\n", {},
                                      [L(b"a {12}\r\n", 12), P(b"x\r\n{3}\r\n\r\nyz"), L(b"\r\n")]),
    "long literal chunked": (b"a {40}\r\n" + bytes(range(40)) + b"\r\n", {},
                             [L(b"a {40}\r\n", 40), P(bytes(range(40))), L(b"\r\n")]),
    "not markers": (b"a {x}\r\nb {}\r\nc {3\r\nd 3}\r\ne {3}\r\r\n", {},
                    [L(b"a {x}\r\n"), L(b"b {}\r\n"), L(b"c {3\r\n"), L(b"d 3}\r\n"),
                     L(b"e {3}\r\r\n")]),
    "server literal": (b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n", {},
                       [L(b"* 1 FETCH (BODY[] {5}\r\n", 5), P(b"hello"), L(b")\r\n")]),
    "line at max_line": (b"a" * 14 + b"\r\n", {"max_line": 16}, [L(b"a" * 14 + b"\r\n")]),
    "largest 32-bit literal": (b"a {4294967295}\r\n", {},
                               [L(b"a {4294967295}\r\n", 4294967295)]),
    "literal at max_literal": (b"a {10}\r\n0123456789\r\n", {"max_literal": 10},
                               [L(b"a {10}\r\n", 10), P(b"0123456789"), L(b"\r\n")]),
}

FRAMER_ERRORS = {
    "too long before CRLF": (b"a1 " + b"x" * 40, {"max_line": 16}, [], LineTooLong),
    "too long after a good line": (b"a1 NOOP\r\n" + b"x" * 40 + b"\r\n", {"max_line": 16},
                                   [L(b"a1 NOOP\r\n")], LineTooLong),
    "one byte over max_line": (b"a" * 15 + b"\r\n", {"max_line": 16}, [], LineTooLong),
    "literal too large": (b"a1 NOOP\r\na2 APPEND x {11}\r\n01234567890\r\n", {"max_literal": 10},
                          [L(b"a1 NOOP\r\n")], LiteralTooLarge),
    "nonsync literal too large": (b"a2 APPEND x {11+}\r\n01234567890\r\n", {"max_literal": 10},
                                  [], LiteralTooLarge),
    "beyond 32 bits, no limit": (b"a {4294967296}\r\n", {}, [], ParseError),
    "eleven digits, no limit": (b"a {00000000001}\r\n", {}, [], ParseError),
    "huge marker, limit set": (b"a {" + b"9" * 200 + b"}\r\n", {"max_literal": 10},
                               [], LiteralTooLarge),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FRAMER_CASES)
def test_framer_table(name, mode):
    stream, limits, expected = FRAMER_CASES[name]
    assert replay(split(stream, mode), **limits) == (expected, None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FRAMER_ERRORS)
def test_framer_errors(name, mode):
    stream, limits, expected, error = FRAMER_ERRORS[name]
    events, raised = replay(split(stream, mode), **limits)
    assert events == expected and raised is not None and raised[0] is error
    assert raised[1] and "\n" not in raised[1]


def test_line_too_long_raised_before_line_end():
    framer = Framer(max_line=16)
    framer.feed(b"a1 LOGIN ")
    with pytest.raises(LineTooLong):
        framer.feed(b"x" * 10)          # no CRLF yet, 19 bytes already
    with pytest.raises(LineTooLong):    # the stream cannot be resynchronised
        framer.feed(b"\r\na2 NOOP\r\n")


def test_literal_too_large_carries_marker_and_resumes_after_sync_literal():
    framer = Framer(max_literal=10)
    with pytest.raises(LiteralTooLarge) as info:
        framer.feed(b"a1 APPEND x {11}\r\na2 NOOP\r\n")
    assert info.value.literal == Literal(11, False) and info.value.events == []
    assert framer.in_literal == 0 and framer.buffered() == len(b"a2 NOOP\r\n")
    assert framer.feed(b"") == [Line(b"a2 NOOP\r\n", None)]


def test_nonsync_literal_too_large_is_final():
    framer = Framer(max_literal=10)
    with pytest.raises(LiteralTooLarge) as info:
        framer.feed(b"a1 APPEND x {11+}\r\n")
    assert info.value.literal == Literal(11, True)
    with pytest.raises(LiteralTooLarge):    # payload must never be read as commands
        framer.feed(b"a2 LOGOUT\r\n")


def test_in_literal_and_buffered():
    framer = Framer(chunk=4)
    assert framer.feed(b"a {10}\r\n012") == [Line(b"a {10}\r\n", Literal(10, False)),
                                            LiteralChunk(b"012", False)]
    assert framer.in_literal == 7 and framer.buffered() == 0
    events = framer.feed(b"3456789 x")
    assert [e.data for e in events] == [b"3456", b"789"] and events[-1].last
    assert framer.in_literal == 0 and framer.buffered() == 2


@pytest.mark.parametrize("mode", MODES)
def test_events_and_pending_give_back_every_byte(mode):
    stream = b"a1 LOGIN {3}\r\nbob x\r\na2 NOOP\r\na3 SEL"
    framer = Framer(chunk=2)
    events = [event for piece in split(stream, mode) for event in framer.feed(piece)]
    assert b"".join(e.data for e in events) + framer.pending() == stream
    assert framer.pending() == b"a3 SEL" and framer.buffered() == 6


def test_pending_keeps_input_after_refused_sync_literal():
    framer = Framer(max_literal=1)
    with pytest.raises(LiteralTooLarge):
        framer.feed(b"a1 APPEND x {2}\r\na2 NO")
    assert framer.pending() == b"a2 NO"
    assert framer.feed(b"OP\r\n") == [Line(b"a2 NOOP\r\n", None)] and framer.pending() == b""


def test_large_literal_sliced_not_copied_per_byte():
    payload = bytes(1_000_000)
    framer = Framer(chunk=65536)
    events = framer.feed(b"a APPEND x {1000000}\r\n") + framer.feed(payload)
    chunks = events[1:]
    assert b"".join(c.data for c in chunks) == payload and len(chunks) == 16
    whole = Framer(chunk=2_000_000)
    whole.feed(b"a APPEND x {1000000}\r\n")
    assert whole.feed(payload)[0].data is payload        # an exact fit is passed on as is


# ------------------------------------------------------------------------------ commands

COMMAND_CASES = {
    "login atoms": (b"a1 login alice secret\r\n", Command("a1", "LOGIN", [Atom("alice"), Atom("secret")])),
    "login quoted": (b'a1 LOGIN "alice" "se cret"\r\n', Command("a1", "LOGIN", [b"alice", b"se cret"])),
    "login escapes": (b'a1 LOGIN "a\\"b" "c\\\\d"\r\n', Command("a1", "LOGIN", [b'a"b', b"c\\d"])),
    "login literals": (b"a1 LOGIN {5}\r\nalice {6}\r\nse\r\nc \r\n",
                       Command("a1", "LOGIN", [b"alice", b"se\r\nc "])),
    "login nonsync": (b"a1 LOGIN {5+}\r\nalice {2+}\r\n\"\\\r\n", Command("a1", "LOGIN", [b"alice", b'"\\'])),
    "login bare LF": (b"a1 LOGIN alice {2}\nxy\n", Command("a1", "LOGIN", [Atom("alice"), b"xy"])),
    "authenticate sasl-ir": (b"A2 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
                             Command("A2", "AUTHENTICATE", [Atom("PLAIN"), Atom("AGFsaWNlAHNlY3JldA==")])),
    "authenticate empty ir": (b"A2 AUTHENTICATE PLAIN =\r\n", Command("A2", "AUTHENTICATE", [Atom("PLAIN"), Atom("=")])),
    "id list": (b'i ID ("name" "x" "version" NIL)\r\n',
                Command("i", "ID", [[b"name", b"x", b"version", Atom("NIL")]])),
    "id nil": (b"i ID NIL\r\n", Command("i", "ID", [Atom("NIL")])),
    "append": (b'a APPEND INBOX (\\Seen \\Draft) "05-Jan-2024 10:00:00 +0000" {7}\r\nSubj: x\r\n',
               Command("a", "APPEND", [Atom("INBOX"), [Atom("\\Seen"), Atom("\\Draft")],
                                       b"05-Jan-2024 10:00:00 +0000", b"Subj: x"])),
    "append literal8": (b"a APPEND INBOX ~{2}\r\n\x00\xff\r\n", Command("a", "APPEND", [Atom("INBOX"), b"\x00\xff"])),
    "uid fetch sections": (b"a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (A B)]<0.100> BODY[])\r\n",
                           Command("a", "UID", [Atom("FETCH"), Atom("1:*"), [
                               Atom("FLAGS"), Atom("BODY.PEEK[HEADER.FIELDS (A B)]<0.100>"), Atom("BODY[]")]])),
    "section with quoted ]": (b'a FETCH 1 BODY[HEADER.FIELDS ("X]")]\r\n',
                              Command("a", "FETCH", [Atom("1"), Atom('BODY[HEADER.FIELDS ("X]")]')])),
    "list patterns": (b'a LIST "" "*"\r\nb LIST "" %/x*\r\n', Command("a", "LIST", [b"", b"*"]),
                      Command("b", "LIST", [b"", Atom("%/x*")])),
    "store flags": (b"a STORE 1 +FLAGS (\\Seen \\* $Forwarded)\r\n",
                    Command("a", "STORE", [Atom("1"), Atom("+FLAGS"), [Atom("\\Seen"), Atom("\\*"), Atom("$Forwarded")]])),
    "nested lists": (b"a X (() (a (b)) c)\r\n", Command("a", "X", [[[], [Atom("a"), [Atom("b")]], Atom("c")]])),
    "literal in list": (b"a X ({1}\r\nq)\r\n", Command("a", "X", [[b"q"]])),
    "utf-8 quoted": ('a SELECT "Entwürfe"\r\n'.encode(), Command("a", "SELECT", ["Entwürfe".encode()])),
    "no args, odd tag": (b"a.1]b NOOP\r\n", Command("a.1]b", "NOOP", [])),
    "trailing space": (b"a NOOP \r\n", Command("a", "NOOP", [])),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", COMMAND_CASES)
def test_command_table(name, mode):
    stream, *expected = COMMAND_CASES[name]
    assert shape([parse_command(parts) for parts in messages(stream, mode)]) == shape(expected)


COMMAND_ERRORS = {
    "empty line": [b"\r\n"],
    "missing name": [b"a1\r\n"],
    "missing name after space": [b"a1 \r\n"],
    "literal as name": [b"a1 {3}\r\n", b"abc", b"\r\n"],
    "leading space": [b" a1 NOOP\r\n"],
    "star tag": [b"* NOOP\r\n"],
    "plus in tag": [b"a+1 NOOP\r\n"],
    "quote in tag": [b'a"1 NOOP\r\n'],
    "8-bit tag": [b"\xe9 NOOP\r\n"],
    "tab after tag": [b"a1\tNOOP\r\n"],
    "bracket in name": [b"a1 NO[OP]\r\n"],
    "unterminated quote": [b'a LOGIN "alice\r\n'],
    "bad escape": [b'a LOGIN "a\\lice" x\r\n'],
    "CR in quote": [b'a LOGIN "a\rb" x\r\n'],
    "NUL in quote": [b'a LOGIN "a\x00b" x\r\n'],
    "unbalanced (": [b"a X (a (b)\r\n"],
    "unbalanced )": [b"a X a)\r\n"],
    "no space between": [b'a X "a""b"\r\n'],
    "no space after list": [b"a X (a)(b)\r\n"],
    "literal glued to atom": [b"a X foo{3}\r\n", b"abc", b"\r\n"],
    "brace mid-line": [b"a X {3} y\r\n"],
    "unterminated section": [b"a FETCH 1 BODY[HEADER\r\n"],
    "8-bit atom": [b"a SELECT Entw\xc3\xbcrfe\r\n"],
    "control char": [b"a X \x01\r\n"],
    "size mismatch": [b"a LOGIN {3}\r\n", b"ab", b"\r\n"],
    "missing payload": [b"a LOGIN {3}\r\n"],
    "payload without marker": [b"a LOGIN x\r\n", b"abc", b"\r\n"],
    "even parts": [b"a LOGIN {3}\r\n", b"abc"],
    "no parts": [],
    "too deep": [b"a X " + b"(" * 33 + b")" * 33 + b"\r\n"],
    "too many args": [b"a X" + b" a" * 65 + b"\r\n"],
    "too many, nested": [b"a X (" + b" a" * 63 + b")" + b" b\r\n"],
}


@pytest.mark.parametrize("name", COMMAND_ERRORS)
def test_command_errors(name):
    with pytest.raises(ParseError) as info:
        parse_command(COMMAND_ERRORS[name])
    assert str(info.value) and "\n" not in str(info.value)


def test_command_limits_are_inclusive():
    assert len(parse_command([b"a X" + b" a" * 64 + b"\r\n"]).args) == 64
    assert parse_command([b"a X" + b" b" * 3 + b"\r\n"], max_args=3).args == [Atom("b")] * 3
    with pytest.raises(ParseError):
        parse_command([b"a X" + b" b" * 4 + b"\r\n"], max_args=3)
    deep = parse_command([b"a X " + b"(" * 32 + b")" * 32 + b"\r\n"], max_args=100)
    for _ in range(32):
        (deep,) = deep.args if isinstance(deep, Command) else deep
    assert deep == []


# ------------------------------------------------------------------------------ responses

RESPONSE_CASES = {
    "greeting": (b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n",
                 Response("*", "OK", ResponseCode("CAPABILITY", "IMAP4rev1 LITERAL+"), "ready")),
    "auth failed": (b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
                    Response("a1", "NO", ResponseCode("AUTHENTICATIONFAILED", ""), "Authentication failed.")),
    "referral": (b"* BYE [REFERRAL imap://u;AUTH=*@h/] go away\r\n",
                 Response("*", "BYE", ResponseCode("REFERRAL", "imap://u;AUTH=*@h/"), "go away")),
    "exists": (b"* 5 EXISTS\r\n", Response("*", "EXISTS", None, "", 5, [])),
    "capability": (b"* CAPABILITY IMAP4rev1 IDLE\r\n",
                   Response("*", "CAPABILITY", None, "IMAP4rev1 IDLE", None, [Atom("IMAP4rev1"), Atom("IDLE")])),
    "continuation empty": (b"+ \r\n", Response("+", "+", None, "")),
    "continuation bare": (b"+\r\n", Response("+", "+", None, "")),
    "continuation base64": (b"+ base64==\r\n", Response("+", "+", None, "base64==")),
    "continuation text": (b"+ [ALERT] go ahead\r\n", Response("+", "+", ResponseCode("ALERT", ""), "go ahead")),
    "list": (b'* LIST (\\HasNoChildren) "/" INBOX\r\n',
             Response("*", "LIST", None, '(\\HasNoChildren) "/" INBOX', None,
                      [[Atom("\\HasNoChildren")], b"/", Atom("INBOX")])),
    "id": (b'* ID ("name" "Dovecot")\r\n', Response("*", "ID", None, '("name" "Dovecot")', None, [[b"name", b"Dovecot"]])),
    "badcharset": (b"a NO [BADCHARSET (UTF-8)] no\r\n", Response("a", "NO", ResponseCode("BADCHARSET", "(UTF-8)"), "no")),
    "quoted ] in code": (b'* OK [X "a]b"] t\r\n', Response("*", "OK", ResponseCode("X", '"a]b"'), "t")),
    "unclosed [ is text": (b"* OK [oops\r\n", Response("*", "OK", None, "[oops")),
    "free text": (b"a1 BAD ( \"{ \xff\r\n", Response("a1", "BAD", None, '( "{ \ufffd')),
    "bare status": (b"a1 ok\r\n", Response("a1", "OK", None, "")),
    "preauth": (b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n",
                Response("*", "PREAUTH", ResponseCode("CAPABILITY", "IMAP4rev1"), "hi")),
    "fetch literal": (b"* 1 FETCH (UID 7 BODY[] {5}\r\nhello)\r\n",
                      Response("*", "FETCH", None, "(UID 7 BODY[] {5}", 1,
                               [[Atom("UID"), Atom("7"), Atom("BODY[]"), b"hello"]])),
    "status": (b"* STATUS INBOX (MESSAGES 3)\r\n",
               Response("*", "STATUS", None, "INBOX (MESSAGES 3)", None, [Atom("INBOX"), [Atom("MESSAGES"), Atom("3")]])),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", RESPONSE_CASES)
def test_response_table(name, mode):
    stream, *expected = RESPONSE_CASES[name]
    assert shape([parse_response(parts) for parts in messages(stream, mode)]) == shape(expected)


RESPONSE_ERRORS = {
    "tagged bye": [b"a1 BYE x\r\n"],
    "tagged data": [b"a1 LIST () \"/\" x\r\n"],
    "tagged number": [b"a1 5 EXISTS\r\n"],
    "star alone": [b"*\r\n"],
    "star space": [b"* \r\n"],
    "number only": [b"* 5\r\n"],
    "number too long": [b"* 12345678901 EXISTS\r\n"],
    "bad data args": [b'* LIST ("a)\r\n'],
    "literal in status": [b"* OK x {3}\r\n", b"abc", b"\r\n"],
    "literal in continuation": [b"+ {3}\r\n", b"abc", b"\r\n"],
    "bad tag": [b"a\"1 OK x\r\n"],
    "empty": [b"\r\n"],
}


@pytest.mark.parametrize("name", RESPONSE_ERRORS)
def test_response_errors(name):
    with pytest.raises(ParseError):
        parse_response(RESPONSE_ERRORS[name])


def test_capabilities():
    assert capabilities("IMAP4rev1 LITERAL+ AUTH=PLAIN") == ["IMAP4REV1", "LITERAL+", "AUTH=PLAIN"]
    assert capabilities("  ") == []
    greeting = parse_response([b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID] hi\r\n"])
    assert capabilities(greeting.code.text) == ["IMAP4REV1", "SASL-IR", "ID"]


def test_error_types():
    assert issubclass(LineTooLong, ParseError) and issubclass(LiteralTooLarge, ParseError)
    assert issubclass(ParseError, ValueError)


# ------------------------------------------------------------------------------ hypothesis

IMAPISH = st.lists(st.sampled_from([
    b"a1 ", b"LOGIN ", b"* ", b"+ ", b"OK ", b"{3}\r\n", b"{0}\r\n", b"{2+}\r\n", b"~{1}\r\n",
    b"{99999999999}\r\n", b"{12}\r\n", b"\r\n", b"\n", b"\r", b"x", b"(", b")", b"[", b"]",
    b'"', b"\\", b" ", b"5 ", b"NIL", b"\x00", b"\xff", b"}", b"{",
]), max_size=40).map(b"".join)
STREAMS = st.one_of(st.binary(max_size=300), IMAPISH)


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:])] or [b""]


@FAST
@given(stream=STREAMS, cuts=st.lists(st.integers(0, 400), max_size=20),
       max_literal=st.sampled_from([None, 0, 5, 40]))
def test_framer_any_split_same_events(stream, cuts, max_literal):
    limits = {"max_line": 24, "max_literal": max_literal, "chunk": 3}
    expected = replay([stream], **limits)
    assert replay(cut(stream, cuts), **limits) == expected
    assert replay(split(stream, "bytes"), **limits) == expected


@FAST
@given(parts=st.lists(STREAMS, min_size=0, max_size=5))
def test_parsers_raise_only_parse_error(parts):
    for parse in (parse_command, parse_response):
        try:
            parse(parts)
        except ParseError:
            pass


@FAST
@given(stream=STREAMS)
def test_parsers_on_framed_streams(stream):
    events, _ = replay([stream], max_line=64, max_literal=64)
    parts: list[bytes] = []
    for event in events:
        parts.append(event[1])
        if event[0] == "line" and event[2] is None:
            for parse in (parse_command, parse_response):
                try:
                    parse(parts)
                except ParseError:
                    pass
            parts = []


ATOMS = st.from_regex(r"\A[A-Za-z0-9.:$\\*%<>+=/-]{1,8}\Z").map(Atom)
STRINGS = st.binary(max_size=12).filter(lambda b: not set(b) & set(b"\r\n\x00"))
LITERALS = st.tuples(st.binary(max_size=12), st.sampled_from(["{%d}", "{%d+}", "~{%d}"]))
TOKENS = st.recursive(st.one_of(ATOMS, STRINGS, LITERALS), lambda inner: st.lists(inner, max_size=4), max_leaves=12)


def serialize(token) -> bytes:
    if isinstance(token, Atom):
        return token.encode()
    if isinstance(token, bytes):
        return b'"' + token.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    if isinstance(token, tuple):
        payload, marker = token
        return (marker % len(payload)).encode() + b"\r\n" + payload
    return b"(" + b" ".join(serialize(t) for t in token) + b")"


def expect(token):
    if isinstance(token, tuple):
        return token[0]
    return [expect(t) for t in token] if isinstance(token, list) else token


def depth(token) -> int:
    return 1 + max(map(depth, token), default=0) if isinstance(token, list) else 0


@FAST
@given(args=st.lists(TOKENS, max_size=5), seed=st.integers(1, 1000))
def test_command_round_trip(args, seed):
    assume(depth(args) <= 33)
    stream = b"t1 XCMD " + b" ".join(serialize(t) for t in args) + b"\r\n"
    (parts,) = messages(stream, f"random{seed}")
    assert shape(parse_command(parts, max_args=10_000)) == shape(Command("t1", "XCMD", expect(args)))


# -- the one-line status fast path of parse_response ------------------------------------------

from gateway.imap import parser  # noqa: E402

_PIECES = [b"*", b"* ", b"a1", b"MG2", b"+", b" ", b"  ", b"OK", b"ok", b"NO", b"BAD", b"BYE",
           b"PREAUTH", b"OKAY", b"CAPABILITY", b"5", b"[", b"]", b"[CAPABILITY IMAP4rev1 ID]",
           b"[REFERRAL imap://h/]", b'"', b'"x]y"', b"\\", b"{5}", b"{5+}", b"}", b"text",
           b"\xc3\xa9", b"\x00", b"\t", b"(", b")", b"%"]


def _outcome(parse, line: bytes):
    try:
        return parse([line])
    except ParseError as exc:
        return ("ParseError", str(exc))


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=8), st.sampled_from([b"\r\n", b"\n", b""]))
def test_the_status_fast_path_answers_as_the_whole_parse(pieces, end):
    line = b"".join(pieces) + end
    assert _outcome(parser.parse_response, line) == _outcome(parser._parse_response, line)


def test_dovecot_login_answers_take_the_fast_path_with_the_same_result():
    for line in (b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
                 b"AUTH=PLAIN] Dovecot (Debian) ready.\r\n",
                 b"MG1 OK ID completed (0.001 + 0.000 secs).\r\n",
                 b'MG2 OK [CAPABILITY IMAP4rev1 SASL-IR ID] Logged in\r\n',
                 b"MG2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
                 b'* BYE [REFERRAL imap://u@h/] go "there"\r\n'):
        assert parser._STATUS_HEAD.match(parser._strip_eol(line))
        assert parser.parse_response([line]) == parser._parse_response([line])


# -- the simple-command fast path of parse_command --------------------------------------------

_COMMAND_PIECES = [b"a1", b"A", b"*", b"+", b" ", b"  ", b"LOGIN", b"login", b"SELECT", b"NOOP",
                   b"user@example.org", b"INBOX", b"NIL", b'"', b'"pass word"', b'""', b"\\",
                   b'"a\\"b"', b"[", b"]", b"BODY[]", b"(", b")", b"{5}", b"{5+}", b"~{5}", b"}",
                   b"%", b"*", b"\xc3\xa9", b'"\xc3\xa9"', b"\x00", b"\t", b"\r", b"\n"]


def _command_outcome(line: bytes, whole: bool, max_args: int = 64):
    try:
        if whole:     # the whole way: the fast path disabled by giving it a non-bytes line
            reader = parser._Reader([line])
            tag = parser._head(reader, parser._TAG, "tag")
            name = parser._head(reader, parser._PLAIN_ATOM, "command name").upper()
            return shape(parser.Command(tag, name, parser._tokenize(reader, max_args)))
        return shape(parse_command([line], max_args=max_args))
    except ParseError as exc:
        return ("ParseError", str(exc))


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_COMMAND_PIECES), max_size=9),
       st.sampled_from([b"\r\n", b"\n", b""]), st.integers(0, 4))
def test_the_simple_command_fast_path_answers_as_the_whole_parse(pieces, end, max_args):
    line = b"".join(pieces) + end
    assert _command_outcome(line, False, max_args) == _command_outcome(line, True, max_args)


def test_login_commands_take_the_simple_command_fast_path():
    for line in (b'a1 LOGIN user@example.org "secret word"\r\n', b"a1 login u p\r\n",
                 b'A2 SELECT "INBOX"\r\n', b"A3 NOOP\r\n"):
        assert parser._simple_command(line, 64) is not None
        assert _command_outcome(line, False) == _command_outcome(line, True)
    for line in (b'a1 LOGIN u "a\\"b"\r\n', b"a1 LOGIN {3}\r\n", b"a1 FETCH 1 (FLAGS)\r\n",
                 b"a1 LOGIN  u p\r\n"):
        assert parser._simple_command(line, 64) is None


# -- the ID list sent to a back-end: quoted() for every value, with or without its call -----

from gateway.imap import backend as imap_backend  # noqa: E402


def _quoted_reference(value: str):
    return imap_backend.quote_bytes(value.encode("utf-8"))      # quoted() without its fast path


def _encode_id_reference(fields):
    items = []
    for key, value in fields[:imap_backend.MAX_ID_FIELDS]:
        key_q = _quoted_reference(key[:30])
        value_q = _quoted_reference(value[:imap_backend.MAX_ID_VALUE])
        if key_q is not None and value_q is not None:
            items.append(key_q + b" " + value_q)
    return b"(" + b" ".join(items) + b")" if items else b"NIL"


_ID_TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["127.0.0.1", "a" * 1000, "a" * 1001,
                                                            'q"', "b\\s", "tab\t", "\x7f", "é"]))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(_ID_TEXT, _ID_TEXT), max_size=5))
def test_encode_id_quotes_each_value_as_quoted_does(fields):
    assert imap_backend.encode_id(fields) == _encode_id_reference(fields)


def test_login_answer_lines_are_parsed_once_and_the_cache_stays_bounded():
    imap_backend._parsed.clear()
    ok = b"MG2 OK [CAPABILITY IMAP4rev1 ID] Logged in\r\n"
    assert imap_backend._parse_line(ok) is imap_backend._parse_line(ok)
    data = b"* CAPABILITY IMAP4rev1 ID\r\n"          # has an args list: never shared
    assert imap_backend._parse_line(data) is not imap_backend._parse_line(data)
    for n in range(3 * imap_backend.MAX_CACHED):
        imap_backend._parse_line(b"* OK greeting %d\r\n" % n)
        assert len(imap_backend._parsed) <= imap_backend.MAX_CACHED
    assert imap_backend._parse_line(b"MG1 OK " + b"x" * 3000 + b"\r\n") is not None
    assert all(len(line) <= imap_backend.MAX_CACHED_LINE for line in imap_backend._parsed)
