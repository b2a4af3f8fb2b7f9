"""Tables of POP3 streams replayed whole, line by line, byte by byte and in random chunks,
plus hypothesis on arbitrary bytes, for gateway.pop3.framer (the same method as
test_imap_parser.py)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.pop3.framer import Line, LineFramer, TooLong
from test_imap_parser import MODES, split

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name: (stream, max_line, expected events as ("line", text) / ("toolong", size), pending)
TABLE = {
    "one": (b"USER alice\r\n", 64, [("line", b"USER alice\r\n")], b""),
    "two": (b"USER a\r\nPASS b\r\n", 64, [("line", b"USER a\r\n"), ("line", b"PASS b\r\n")], b""),
    "bare_lf": (b"CAPA\nQUIT\r\n", 64, [("line", b"CAPA\n"), ("line", b"QUIT\r\n")], b""),
    "partial": (b"CAPA\r\nQU", 64, [("line", b"CAPA\r\n")], b"QU"),
    "empty_line": (b"\r\n", 64, [("line", b"\r\n")], b""),
    "exact_limit": (b"12345678\r\n", 10, [("line", b"12345678\r\n")], b""),
    "one_over": (b"123456789\r\nNOOP\r\n", 10, [("toolong", 11), ("line", b"NOOP\r\n")], b""),
    "long_then_ok": (b"x" * 100 + b"\nSTAT\r\n", 16, [("toolong", 101), ("line", b"STAT\r\n")], b""),
    "long_unfinished": (b"y" * 50, 16, [], b""),
    "cr_inside": (b"US\rER\r\n", 64, [("line", b"US\rER\r\n")], b""),
}


def replay(pieces: list[bytes], max_line: int) -> tuple[list[tuple], bytes]:
    framer = LineFramer(max_line)
    events = []
    for piece in pieces:
        for event in framer.feed(piece):
            if isinstance(event, Line):
                events.append(("line", event.data))
            else:
                assert isinstance(event, TooLong)
                events.append(("toolong", event.size))
    return events, framer.pending()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(TABLE))
def test_framer_table(name, mode):
    stream, max_line, expected, pending = TABLE[name]
    assert replay(split(stream, mode), max_line) == (expected, pending)


def test_line_text_strips_the_line_end_only():
    assert Line(b"PASS a b \r\n").text == b"PASS a b "
    assert Line(b"USER x\n").text == b"USER x"


def test_memory_stays_bounded_without_a_line_end():
    framer = LineFramer(32)
    for _ in range(1000):
        assert framer.feed(b"z" * 100) == []
        assert len(framer.pending()) <= 32
    assert framer.feed(b"\r\n") == [TooLong(100_002)]


def test_max_line_must_be_positive():
    with pytest.raises(ValueError):
        LineFramer(0)


@FAST
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=12),
       st.integers(1, 80))
def test_any_split_same_events(stream, cuts, max_line):
    cuts = sorted(set(c for c in cuts if c <= len(stream)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    whole = replay([stream], max_line)
    assert replay(pieces, max_line) == whole
    events, pending = whole
    # every kept byte comes back, in order; dropped lines account for their size
    kept = b"".join(data for kind, data in events if kind == "line")
    dropped = sum(size for kind, size in events if kind == "toolong")
    assert len(kept) + dropped + len(pending) <= len(stream)
    assert all(len(data) <= max_line for kind, data in events if kind == "line")
