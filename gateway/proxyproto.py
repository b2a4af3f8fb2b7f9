"""HAProxy's PROXY protocol, versions 1 and 2 (doc/proxy-protocol.txt): the load balancer's
header that carries the real client address in front of the first byte of the connection.

``parse(buffer)`` is pure: it returns ``None`` while the buffer is a valid beginning of a
header, a ``Header`` once complete (``consumed`` bytes long), or raises ``ProxyError``.
``safe_read_size(buffer)`` says how many more bytes may be read from the socket without
reading past the header: the bytes after it belong to the client (an IMAP command, or a TLS
ClientHello that OpenSSL must read from the descriptor itself), so nothing is over-read.
``read_header(sock, timeout)`` does the reading, bounded in time and size.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107                 # the spec's bound, CRLF included
V1_MIN = 15                  # "PROXY UNKNOWN\r\n"
V2_MAX_PAYLOAD = 1024        # addresses plus TLVs we accept (HAProxy sends far less)
TIMEOUT = 3.0                # the whole header, from accept
_V2_FAMILIES = {0x11: (socket.AF_INET, 12, "!4s4sHH"), 0x21: (socket.AF_INET6, 36, "!16s16sHH")}


class ProxyError(ValueError):
    """A malformed, oversized or missing header (the connection is closed)."""


@dataclass(frozen=True)
class Header:
    """The client's address as the load balancer saw it; ``source`` None for LOCAL/UNKNOWN
    (a health check of the balancer itself: the connection's own address applies)."""
    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    consumed: int


def parse(buffer: bytes) -> Header | None:
    """The header at the start of ``buffer``: None = incomplete so far; raises ProxyError."""
    if not buffer:
        return None
    if buffer[0] == 0x0D:
        return _parse_v2(buffer)
    if buffer[0] == 0x50:   # "P"
        return _parse_v1(buffer)
    raise ProxyError("no PROXY header")


def safe_read_size(buffer: bytes) -> int:
    """How many bytes may be read next without passing the end of the header."""
    # The shortest v1 header is 15 bytes, the v2 fixed part 16: neither can be passed.
    if len(buffer) < V1_MIN:
        return V1_MIN - len(buffer)
    if buffer[0] == 0x0D:
        if len(buffer) < 16:
            return 16 - len(buffer)
        length = struct.unpack("!H", buffer[14:16])[0]
        return max(16 + length - len(buffer), 1)
    # v1: the next CRLF may begin at the next byte; after a CR only one byte is safe.
    return 1 if buffer.endswith(b"\r") else 2


def _parse_v1(buffer: bytes) -> Header | None:
    end = buffer.find(b"\r\n")
    if end < 0:
        if not V1_PREFIX.startswith(buffer[:6]):
            raise ProxyError("no PROXY header")
        if len(buffer) >= V1_MAX or b"\n" in buffer:
            raise ProxyError("v1 header without CRLF within 107 bytes")
        return None
    if end + 2 > V1_MAX:
        raise ProxyError("v1 header longer than 107 bytes")
    line = buffer[:end]
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    if words[0] != "PROXY" or len(words) < 2:
        raise ProxyError("no PROXY header")
    if words[1] == "UNKNOWN":
        return Header(1, None, None, end + 2)
    if words[1] not in ("TCP4", "TCP6") or len(words) != 6:
        raise ProxyError(f"v1 header malformed: {line[:60]!r}")
    version = 4 if words[1] == "TCP4" else 6
    source = (_v1_address(words[2], version), _v1_port(words[4]))
    destination = (_v1_address(words[3], version), _v1_port(words[5]))
    return Header(1, source, destination, end + 2)


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"v1 header: bad address {text[:40]!r}") from None
    if address.version != version:
        raise ProxyError(f"v1 header: {text!r} is not IPv{version}")
    return str(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise ProxyError(f"v1 header: bad port {text[:10]!r}")
    return int(text)


def _parse_v2(buffer: bytes) -> Header | None:
    if not buffer.startswith(V2_SIGNATURE[:len(buffer)]):
        raise ProxyError("no PROXY header")
    if len(buffer) < 16:
        return None
    version_command, family = buffer[12], buffer[13]
    if version_command >> 4 != 2:
        raise ProxyError(f"v2 header: version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyError(f"v2 header: command {command}")
    length = struct.unpack("!H", buffer[14:16])[0]
    if length > V2_MAX_PAYLOAD:
        raise ProxyError(f"v2 header: {length} bytes of addresses is too long")
    if len(buffer) < 16 + length:
        return None
    if command == 0:      # LOCAL: the balancer's own connection (health check)
        return Header(2, None, None, 16 + length)
    if family not in _V2_FAMILIES:
        if family == 0x00:   # UNSPEC: unknown protocol, keep the connection's address
            return Header(2, None, None, 16 + length)
        raise ProxyError(f"v2 header: unsupported family 0x{family:02x}")
    af, size, layout = _V2_FAMILIES[family]
    if length < size:
        raise ProxyError(f"v2 header: {length} bytes too short for its addresses")
    src, dst, sport, dport = struct.unpack(layout, buffer[16:16 + size])
    return Header(2, (socket.inet_ntop(af, src), sport), (socket.inet_ntop(af, dst), dport),
                  16 + length)


def is_trusted(address: str, networks) -> bool:
    """Whether ``address`` lies in one of ``networks`` (ip_network objects)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks if network.version == ip.version)


def networks(cidrs) -> tuple:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def read_header(sock, timeout: float = TIMEOUT) -> Header:
    """Read exactly one header from ``sock`` within ``timeout`` seconds; raises ProxyError
    (malformed, too long, closed, timed out).  Restores no timeout: the caller sets its own."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while True:
        header = parse(buffer)
        if header is not None:
            return header
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProxyError("no complete PROXY header within the time bound")
        sock.settimeout(remaining)
        try:
            data = sock.recv(safe_read_size(buffer))
        except socket.timeout:
            raise ProxyError("no complete PROXY header within the time bound") from None
        except OSError as exc:
            raise ProxyError(f"read error before the PROXY header: {exc.strerror or exc}") from None
        if not data:
            raise ProxyError("closed before a complete PROXY header")
        buffer += data
