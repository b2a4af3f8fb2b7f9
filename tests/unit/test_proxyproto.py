"""The PROXY protocol parser: tables replayed whole, byte by byte and in random chunks, the
"never read past the header" rule, and hypothesis for arbitrary input."""
from __future__ import annotations

import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import proxyproto
from gateway.proxyproto import Header, ProxyError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIG = proxyproto.V2_SIGNATURE


def v2(command: int, family: int, payload: bytes) -> bytes:
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(payload)) + payload


V4 = socket.inet_aton("192.0.2.7") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 51000, 993)
V6 = (socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "::1")
      + struct.pack("!HH", 40000, 143))
TLV = b"\x04\x00\x05hello"   # a PP2_TYPE_NOOP TLV after the addresses

VALID = [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 993\r\n",
     Header(1, ("192.0.2.7", 51000), ("10.0.0.1", 993), 41)),
    (b"PROXY TCP6 2001:db8::7 ::1 40000 143\r\n",
     Header(1, ("2001:db8::7", 40000), ("::1", 143), 38)),
    (b"PROXY UNKNOWN\r\n", Header(1, None, None, 15)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Header(1, None, None, 35)),
    (v2(1, 0x11, V4), Header(2, ("192.0.2.7", 51000), ("10.0.0.1", 993), 28)),
    (v2(1, 0x11, V4 + TLV), Header(2, ("192.0.2.7", 51000), ("10.0.0.1", 993), 36)),
    (v2(1, 0x21, V6), Header(2, ("2001:db8::7", 40000), ("::1", 143), 52)),
    (v2(0, 0x00, b""), Header(2, None, None, 16)),                 # LOCAL: a health check
    (v2(1, 0x00, b""), Header(2, None, None, 16)),                 # UNSPEC
]

INVALID = [
    (b"a LOGIN user pass\r\n", "no PROXY header"),
    (b"\x16\x03\x01\x02\x00\x01", "no PROXY header"),                 # a TLS ClientHello
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 51000\r\n", "malformed"),
    (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", "not IPv4"),
    (b"PROXY TCP4 192.0.2.777 10.0.0.1 1 2\r\n", "bad address"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 0080 2\r\n", "bad port"),
    (b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 " + b"1" * 100 + b"\r\n", "107"),
    (b"PROXY TCP4 192.0.2.7\n", "CRLF"),
    (SIG + bytes([0x10, 0x11]) + struct.pack("!H", 12) + V4, "version"),
    (SIG + bytes([0x22, 0x11]) + struct.pack("!H", 12) + V4, "command"),
    (v2(1, 0x11, V4[:8]), "too short"),
    (v2(1, 0x31, b"x" * 216), "unsupported family"),
    (SIG + bytes([0x21, 0x11]) + struct.pack("!H", 5000), "too long"),
]


def replay(data: bytes, sizes) -> Header | None:
    """Feed ``data`` in pieces of the given sizes, as read_header would, until a header."""
    buffer, pos = b"", 0
    for size in sizes:
        if pos >= len(data):
            break
        buffer += data[pos:pos + size]
        pos += size
        header = proxyproto.parse(buffer)
        if header is not None:
            return header
    return None


def chunkings(data: bytes):
    yield "whole", [len(data)]
    yield "bytes", [1] * len(data)
    rng = random.Random(len(data))
    for n in range(3):
        yield f"random{n}", [rng.randint(1, 9) for _ in range(len(data))]


@pytest.mark.parametrize("data,expected", VALID)
def test_valid_headers_in_every_chunking(data, expected):
    for name, sizes in chunkings(data + b"a CAPABILITY\r\n"):
        header = replay(data + b"a CAPABILITY\r\n", sizes)
        assert header == expected, name


@pytest.mark.parametrize("data,reason", INVALID)
def test_invalid_headers_in_every_chunking(data, reason):
    for name, sizes in chunkings(data):
        with pytest.raises(ProxyError, match=reason):
            if replay(data, sizes) is None:
                raise AssertionError(f"{name}: no verdict")


@pytest.mark.parametrize("data,expected", VALID)
def test_safe_reads_never_pass_the_header(data, expected):
    """Reading as safe_read_size says ends exactly at the header's last byte."""
    stream = data + b"\x16\x03\x01 the ClientHello that OpenSSL must read itself"
    buffer = b""
    while proxyproto.parse(buffer) is None:
        size = proxyproto.safe_read_size(buffer)
        assert size >= 1
        buffer += stream[len(buffer):len(buffer) + size]
    assert len(buffer) == expected.consumed


def test_trusted_networks():
    nets = proxyproto.networks(["127.0.0.0/8", "::1/128", "10.1.0.0/16"])
    assert proxyproto.is_trusted("127.0.0.2", nets)
    assert proxyproto.is_trusted("10.1.2.3", nets)
    assert proxyproto.is_trusted("::ffff:10.1.2.3", nets)
    assert not proxyproto.is_trusted("10.2.0.1", nets)
    assert not proxyproto.is_trusted("not-an-ip", nets)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_a_header_none_or_proxy_error(data):
    try:
        header = proxyproto.parse(data)
    except ProxyError:
        return
    if header is not None:
        assert header.consumed <= len(data)
    assert proxyproto.safe_read_size(data) >= 1


@FAST
@given(st.sampled_from(VALID), st.binary(max_size=40), st.randoms())
def test_valid_headers_followed_by_anything(case, tail, rng):
    data, expected = case
    sizes = [rng.randint(1, 20) for _ in range(len(data) + len(tail))]
    assert replay(data + tail, sizes) == expected
