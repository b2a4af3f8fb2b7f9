"""gateway.stream.StreamReader and gateway.imap.reader.ImapReader over fake sockets: lazy
framing (what is not asked for stays raw), the total deadline, the total command bound,
refused literals."""
from __future__ import annotations

import socket
import time

import pytest

from gateway.imap.reader import ImapReader, LiteralRefused, TooLarge
from gateway.pop3.framer import LineFramer
from gateway.stream import DeadlineExceeded, PeerClosed, ReadTimeout, StreamReader


class FakeSocket:
    """Gives ``chunks`` one per recv, then EOF; ``delay`` seconds per recv; a chunk None is a
    timeout."""

    def __init__(self, chunks, delay: float = 0.0):
        self.chunks = list(chunks)
        self.delay = delay
        self.timeout = None

    def gettimeout(self):
        return self.timeout

    def settimeout(self, timeout):
        self.timeout = timeout

    def recv(self, size: int) -> bytes:
        time.sleep(self.delay)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if chunk is None:
            raise socket.timeout("timed out")
        return chunk


def imap_reader(chunks, **kwargs) -> ImapReader:
    kwargs.setdefault("max_line", 1024)
    kwargs.setdefault("max_literal", 64)
    return ImapReader(FakeSocket(chunks), **kwargs)


def test_bytes_behind_the_command_asked_for_stay_raw():
    """Issue 12 item 6: an APPEND with a big LITERAL+ pipelined behind LOGIN is not framed
    with the pre-login limits; it is handed over byte for byte."""
    rest = b"b APPEND INBOX {20000+}\r\n" + b"m" * 20000 + b"\r\n"
    reader = imap_reader([b'a LOGIN "u" {2+}\r\npw\r\n' + rest])
    assert reader.read_parts() == [b'a LOGIN "u" {2+}\r\n', b"pw", b"\r\n"]
    assert reader.leftover() == rest


def test_leftover_keeps_order_of_events_partial_line_and_raw_bytes():
    reader = imap_reader([b"a NOOP\r\nb NOOP\r\nc NO", b"OP\r\n"])
    assert reader.read_parts() == [b"a NOOP\r\n"]
    assert reader.leftover() == b"b NOOP\r\nc NO"


def test_a_command_has_a_total_size_bound():
    chunks = [b"a LOGIN {60+}\r\n" + b"x" * 60] + [b" {60+}\r\n" + b"y" * 60] * 10
    reader = imap_reader(chunks, max_total=200)
    with pytest.raises(TooLarge):
        reader.read_parts()


def test_the_deadline_ends_a_trickle_that_the_idle_timeout_would_not():
    reader = StreamReader(FakeSocket([b"x"] * 1000, delay=0.01), LineFramer(4096))
    reader.idle_timeout = 5.0
    reader.deadline = time.monotonic() + 0.1
    with pytest.raises(DeadlineExceeded):
        reader.next_event()


def test_idle_timeout_and_eof_are_told_apart():
    with pytest.raises(ReadTimeout) as idle:
        StreamReader(FakeSocket([None]), LineFramer(64)).next_event()
    assert not isinstance(idle.value, DeadlineExceeded)
    with pytest.raises(PeerClosed):
        StreamReader(FakeSocket([b"CAPA"]), LineFramer(64)).next_event()


def test_a_refused_sync_literal_restarts_framing_at_the_next_line():
    reader = imap_reader([b"a LOGIN ~{5}\r\n", b"b NOOP\r\n"])
    with pytest.raises(LiteralRefused):
        reader.read_parts(on_literal=lambda line: False)
    assert reader.read_parts() == [b"b NOOP\r\n"]


def test_a_refused_nonsync_literal_is_read_past_with_the_rest_of_its_command():
    reader = imap_reader([b"a LOGIN ~{5+}\r\nhello {1+}\r\nx\r\nb NOOP\r\n"])
    with pytest.raises(LiteralRefused):
        reader.read_parts(on_literal=lambda line: False)
    assert reader.read_parts() == [b"b NOOP\r\n"]


def test_on_literal_sees_each_literal_before_its_payload():
    seen = []
    reader = imap_reader([b"a LOGIN {1}\r\n", b"u {2}\r\n", b"pw\r\n"])
    parts = reader.read_parts(on_literal=lambda line: seen.append(line.literal.size) or True)
    assert seen == [1, 2] and parts == [b"a LOGIN {1}\r\n", b"u", b" {2}\r\n", b"pw", b"\r\n"]


# -- the line fast path (line_at): the framer's parts, whatever the split --------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.imap import parser  # noqa: E402

_STREAM_PIECES = [b"a1 LOGIN u p", b"* OK [CAPABILITY IMAP4rev1] hi", b"MG2 OK done", b" ",
                  b"{3}", b"{3+}", b"~{2}", b"}", b"abc", b"\r\n", b"\n", b"\r", b"x" * 30]


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut at the given places (as recv may return it)."""
    chunks, last = [], 0
    for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
        if cut > last:
            chunks.append(stream[last:cut])
            last = cut
    return chunks


def _imap_reads(chunks: list[bytes], fast: bool):
    reader = ImapReader(FakeSocket(chunks), max_line=40, max_literal=8)
    if not fast:
        reader.line_at = None           # the framer's way only
    got = []
    while len(got) < 40:        # (a reader is asked again after a framing error, as a relay may)
        try:
            got.append(reader.read_parts())
        except parser.ParseError as exc:
            got.append(type(exc).__name__)
        except PeerClosed:
            break
    return got, reader.leftover()


def _pop3_reads(chunks: list[bytes], fast: bool):
    reader = StreamReader(FakeSocket(chunks), LineFramer(24))
    if not fast:
        reader.line_at = None           # the framer's way only
    got = []
    while True:
        try:
            event = reader.next_event()
        except PeerClosed:
            return got, reader.leftover()
        got.append(event)


_POP3_PIECES = [b"USER u", b"PASS secret", b"+OK ready", b"-ERR no", b" ", b"\r\n", b"\n",
                b"\r", b".", b"x" * 30]


@pytest.mark.parametrize("pieces, reads", [(_STREAM_PIECES, _imap_reads),
                                           (_POP3_PIECES, _pop3_reads)], ids=["imap", "pop3"])
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_line_fast_paths_give_what_the_framers_give(pieces, reads, data):
    """The whole lines taken without framing them (the framers' ``line_at``) are the
    framer's own events, whatever the bytes and however recv cuts them."""
    stream = b"".join(data.draw(st.lists(st.sampled_from(pieces), max_size=12)))
    chunks = _chunks(stream, data.draw(st.lists(st.integers(0, 400), max_size=5)))
    assert reads(chunks, True) == reads(chunks, False)


def test_leftover_lets_go_of_the_last_read():
    """A logged-in session keeps its back-end reader: the bytes of its last read must not
    live on with it (half a KiB per idle connection)."""
    reader = imap_reader([b"MG2 OK [CAPABILITY IMAP4rev1 ID] Logged in\r\n"])
    reader.read_parts()
    assert reader.leftover() == b""
    assert reader.raw == b""
