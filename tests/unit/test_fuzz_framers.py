"""Hypothesis on the framers of the other wings: POP3 lines, the PROXY header, SMTP lines,
replies and transactions.  Each test skips until its module exists in this checkout (they land
from other branches); once there, any split of a stream must give the same events, memory
stays bounded, and malformed input is refused only with the module's own error.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
CUTS = st.lists(st.integers(0, 600), max_size=20)


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:])]


def lines_of(pieces: list[bytes]) -> st.SearchStrategy:
    return st.lists(st.sampled_from(pieces), max_size=40).map(b"".join)


# -- POP3 -------------------------------------------------------------------------------------

POP3ISH = lines_of([b"USER a\r\n", b"PASS b\r\n", b"CAPA\r\n", b"AUTH PLAIN\r\n", b"x" * 30,
                    b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b" ", b"+OK ", b"-ERR ", b".\r\n"])


@FAST
@given(stream=st.one_of(st.binary(max_size=400), POP3ISH), cuts=CUTS,
       max_line=st.sampled_from([1, 8, 24, 512]))
def test_pop3_framer_any_split(stream, cuts, max_line):
    framer_module = pytest.importorskip("gateway.pop3.framer")

    def events(pieces):
        framer = framer_module.LineFramer(max_line=max_line)
        found = []
        for piece in pieces:
            found += framer.feed(piece)
            assert len(framer.pending()) <= max_line
        return found, framer.pending()

    assert events(cut(stream, cuts)) == events([stream])


# -- the PROXY header -----------------------------------------------------------------------------

V2 = b"\r\n\r\n\x00\r\nQUIT\n"
PROXYISH = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", b"PROXY "]),
              lines_of([b"127.0.0.1 ", b"::1 ", b"10.0.0.1", b"1 ", b"65535 ", b"99999 ",
                        b"\r\n", b"\n", b" ", b"x"])).map(b"".join),
    st.tuples(st.just(V2), st.binary(min_size=0, max_size=4), st.binary(max_size=60))
      .map(b"".join),
)


@FAST
@given(data=PROXYISH, more=st.binary(max_size=40))
def test_proxy_header_prefixes_agree(data, more):
    proxyproto = pytest.importorskip("gateway.proxyproto")

    def outcome(buffer):
        try:
            return proxyproto.parse(buffer)
        except proxyproto.ProxyError:
            return "error"

    whole = outcome(data)
    if whole is not None and whole != "error":
        assert whole.consumed <= len(data)
        assert outcome(data + more) == whole        # bytes after the header change nothing
    for end in range(len(data)):
        prefix = outcome(data[:end])
        # A prefix is "incomplete", or already the same verdict as the whole.
        assert prefix is None or prefix == whole or whole == "error" and prefix == "error"
        if prefix is None:
            assert proxyproto.safe_read_size(data[:end]) >= 1


# -- SMTP -------------------------------------------------------------------------------------

SMTPISH = lines_of([b"EHLO x\r\n", b"AUTH PLAIN AGEAYg==\r\n", b"MAIL FROM:<a@b>\r\n",
                    b"RCPT TO:<c@d>\r\n", b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 0 LAST\r\n",
                    b"hello", b".\r\n", b"..\r\n", b"\r\n", b"\n", b"x" * 40, b"QUIT\r\n",
                    b"RSET\r\n", b"\x00", b"\xff"])
REPLYISH = lines_of([b"250-a\r\n", b"250 b\r\n", b"220 ready\r\n", b"354 go\r\n",
                     b"550 no\r\n", b"250", b"-", b" ", b"\r\n", b"x", b"999 z\r\n"])


@FAST
@given(stream=st.one_of(st.binary(max_size=400), SMTPISH), cuts=CUTS,
       max_line=st.sampled_from([8, 64, 512]))
def test_smtp_line_framer_any_split(stream, cuts, max_line):
    framer = pytest.importorskip("gateway.smtp.framer")

    def events(pieces):
        lines = framer.LineFramer(max_line=max_line)
        found = []
        for piece in pieces:
            found += lines.feed(piece)
            assert len(lines.buffer) <= max_line + len(piece)
        return found

    assert events(cut(stream, cuts)) == events([stream])


@FAST
@given(stream=st.one_of(st.binary(max_size=300), REPLYISH), cuts=CUTS)
def test_smtp_reply_framer_any_split_or_reply_error(stream, cuts):
    framer = pytest.importorskip("gateway.smtp.framer")

    def events(pieces):
        replies = framer.ReplyFramer()
        found = []
        try:
            for piece in pieces:
                found += replies.feed(piece)
        except framer.ReplyError:
            found.append("error")
        return found

    whole, split = events([stream]), events(cut(stream, cuts))
    if "error" in whole or "error" in split:
        # (a feed that raises loses the replies it completed first: only the verdict counts)
        assert whole[-1:] == split[-1:] == ["error"]
    else:
        assert split == whole


@FAST
@given(stream=st.one_of(st.binary(max_size=400), SMTPISH), cuts=CUTS,
       max_size=st.sampled_from([0, 10, 1000]))
def test_smtp_transactions_any_split(stream, cuts, max_size):
    framer = pytest.importorskip("gateway.smtp.framer")

    def verdicts(pieces):
        transactions = framer.Transactions(max_size)
        found = []
        for piece in pieces:
            verdict = transactions.feed(piece)
            if verdict is not None:
                found.append(verdict)
                break
        return found

    whole, split = verdicts([stream]), verdicts(cut(stream, cuts))
    assert [type(v) for v in split] == [type(v) for v in whole]
