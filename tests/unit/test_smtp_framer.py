"""Tables of SMTP streams replayed whole, line by line, byte by byte and in random chunks,
plus hypothesis on arbitrary bytes, for gateway.smtp.framer."""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.smtp.framer import (
    MAX_COMMAND_LINE, LineFramer, Reply, ReplyError, ReplyFramer, TooLong, Transactions,
)

from helpers import SPLIT_MODES as MODES, split

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- lines ---------------------------------------------------------------------------------

LONG = b"x" * (MAX_COMMAND_LINE - 2)
LINE_CASES = [
    (b"EHLO client\r\n", [b"EHLO client"], b""),
    (b"EHLO a\r\nAUTH PLAIN\r\n*\r\n", [b"EHLO a", b"AUTH PLAIN", b"*"], b""),
    (b"NOOP\nQUIT\r\n", [b"NOOP", b"QUIT"], b""),                     # bare LF
    (b"\r\n", [b""], b""),
    (b"MAIL FROM:<a@b>\r\nRCPT", [b"MAIL FROM:<a@b>"], b"RCPT"),      # rest kept for take()
    (LONG + b"\r\n", [LONG], b""),                                    # exactly 512 octets
    (LONG + b"y\r\nNOOP\r\n", [TooLong(MAX_COMMAND_LINE + 1), b"NOOP"], b""),
    (b"z" * 5000 + b"\r\nQUIT\r\n", [TooLong(5002), b"QUIT"], b""),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream, expected, rest", LINE_CASES)
def test_line_framer_tables(stream, expected, rest, mode):
    framer = LineFramer()
    events = []
    for piece in split(stream, mode):
        events += framer.feed(piece)
        assert len(framer.buffer) <= MAX_COMMAND_LINE + 9   # never holds a long line
    assert [e if isinstance(e, TooLong) else e.text for e in events] == expected
    # Nothing is lost: the events' data and the rest are the stream, less dropped lines.
    assert b"".join(e.data for e in events) + framer.pending() == \
        b"".join(l for l in re.split(rb"(?<=\n)", stream) if len(l) <= MAX_COMMAND_LINE
                 or not l.endswith(b"\n"))
    assert rest == b"" or stream.endswith(rest)


@FAST
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=64))
def test_line_framer_any_bytes_any_cut(stream, cut):
    whole = LineFramer(64)
    expected = whole.feed(stream)
    pieces = LineFramer(64)
    events = []
    for start in range(0, len(stream), cut):
        events += pieces.feed(stream[start:start + cut])
        assert len(pieces.buffer) <= 64 + cut
    assert events == expected
    for event in events:
        assert isinstance(event, TooLong) or (len(event.data) <= 64 and
                                              event.data.endswith(b"\n") and
                                              b"\n" not in event.text)


# -- replies -----------------------------------------------------------------------------------

REPLY_CASES = [
    (b"220 mx ESMTP\r\n", [Reply(220, ("mx ESMTP",))]),
    (b"250-mx\r\n250-PIPELINING\r\n250 XCLIENT ADDR PORT\r\n",
     [Reply(250, ("mx", "PIPELINING", "XCLIENT ADDR PORT"))]),
    (b"235 2.7.0 ok\r\n535 5.7.8 no\r\n", [Reply(235, ("2.7.0 ok",)), Reply(535, ("5.7.8 no",))]),
    (b"250\r\n", [Reply(250, ("",))]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream, expected", REPLY_CASES)
def test_reply_framer_tables(stream, expected, mode):
    framer = ReplyFramer()
    replies = []
    for piece in split(stream, mode):
        replies += framer.feed(piece)
    assert [(r.code, r.lines) for r in replies] == [(r.code, r.lines) for r in expected]
    assert b"".join(r.data for r in replies) == stream and framer.pending() == b""


@pytest.mark.parametrize("stream", [
    b"hello\r\n", b"250-a\r\n550 b\r\n", b"2500 x\r\n", b"099 x\r\n",
    b"250-" + b"x" * 5000 + b"\r\n", b"".join(b"250-x\r\n" for _ in range(101)),
])
def test_reply_framer_refuses_what_is_not_smtp(stream):
    with pytest.raises(ReplyError):
        ReplyFramer().feed(stream)


@FAST
@given(st.binary(max_size=2000))
def test_reply_framer_any_bytes_replies_or_reply_error(stream):
    try:
        for reply in ReplyFramer().feed(stream):
            assert 200 <= reply.code < 600 and reply.lines
    except ReplyError:
        pass


# -- transactions after login --------------------------------------------------------------------

def message(body_lines: int) -> bytes:
    return b"Subject: t\r\n\r\n" + b"0123456789\r\n" * body_lines


TRANSACTION_CASES = [
    # (stream, max size, expected verdict reason or None, mode at the end, quit seen)
    (b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n" + message(5) + b".\r\nQUIT\r\n",
     1000, None, "command", True),
    (b"MAIL FROM:<a> SIZE=1001\r\n", 1000, "declared size too big", "command", False),
    (b"MAIL FROM:<a> SIZE=1000 BODY=8BITMIME\r\n", 1000, None, "command", False),
    (b"MAIL FROM:<a>\r\nDATA\r\n" + message(200) + b".\r\n", 1000, "message too big", "data",
     False),
    # A dot-stuffed ".\r\n" inside the content ("..") does not end it; QUIT in content is data.
    (b"DATA\r\nline\r\n..\r\nQUIT\r\n.\r\n", 1000, None, "command", False),
    (b"DATA\r\n.\r\nQUIT\r\n", 1000, None, "command", True),           # an empty message
    (b"DATA\n.\nQUIT\n", 1000, None, "command", True),                  # bare LF line ends
    (b"BDAT 12\r\nQUIT\r\nQUIT\r\nBDAT 0 LAST\r\n", 1000, None, "command", False),
    (b"BDAT 12 LAST\r\n0123456789\r\nQUIT\r\n", 1000, None, "command", True),
    (b"BDAT 2000 LAST\r\n" + b"x" * 1001, 1000, "message too big", "bdat", False),
    (b"MAIL FROM:<a>\r\nDATA\r\n" + message(80) + b".\r\nMAIL FROM:<a>\r\nDATA\r\n"
     + message(80) + b".\r\n", 1000, None, "command", False),           # the count restarts
    (b"NOOP " + b"x" * 5000 + b"\r\nQUIT\r\n", 1000, None, "command", True),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream, limit, reason, end_mode, quit_seen", TRANSACTION_CASES)
def test_transactions_tables(stream, limit, reason, end_mode, quit_seen, mode):
    tracker = Transactions(limit)
    verdicts = []
    for piece in split(stream, mode):
        # The relay hands its shared buffer and a size: junk after ``size`` must not count.
        buffer = bytearray(piece + b"\r\nQUIT\r\n")
        verdict = tracker.feed(buffer, len(piece))
        if verdict is not None:
            verdicts.append(verdict)
        assert len(tracker.line) <= MAX_COMMAND_LINE
    assert [v.reason for v in verdicts] == ([reason] if reason else [])
    if verdicts:
        assert verdicts[0].reply.startswith(b"552 5.3.4 ")
    else:
        assert tracker.mode == end_mode
    assert tracker.quit_seen is quit_seen


@FAST
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=100))
def test_transactions_any_bytes_any_cut(stream, cut):
    whole = Transactions(500)
    expected = whole.feed(stream)
    pieces = Transactions(500)
    verdicts = [pieces.feed(stream[i:i + cut]) for i in range(0, len(stream), cut)]
    verdicts = [v for v in verdicts if v is not None]
    assert verdicts == ([expected] if expected else [])
    assert (pieces.mode, pieces.quit_seen) == (whole.mode, whole.quit_seen) or expected
