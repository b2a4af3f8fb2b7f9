"""A connection to an IMAP back-end: reading its responses, sending commands the gateway
built, its capabilities; and the capability list a client is shown.

Every command sent here is built by the gateway.  String arguments always travel as literals
(``{n+}`` when the back-end offers LITERAL+, synchronising ``{n}`` otherwise, as nginx's mail
proxy does), so nothing a client typed can end one command and start another.  The login
sequence itself is gateway.imap.login.
"""
from __future__ import annotations

import functools
import re

from gateway.imap import parser
from gateway.imap.parser import Response
from gateway.imap.reader import ImapReader
from gateway.session import Failure, LoginError, Target
from gateway.stream import ReadError

MAX_RESPONSE_LINE = 65536
MAX_RESPONSE_LITERAL = 1 << 20   # a literal in a login-phase response (ID values, etc.)
MAX_ID_FIELDS = 30               # RFC 2971 §3.3
MAX_ID_VALUE = 1024

# Capabilities the gateway cannot carry after login (it would have to terminate them).
POSTAUTH_DROP = ("COMPRESS=", "LOGIN-REFERRALS", "MAILBOX-REFERRALS", "STARTTLS",
                 "LOGINDISABLED", "AUTH=", "SASL-IR")


@functools.lru_cache(maxsize=64)
def filter_capabilities(words: tuple[str, ...], keep: tuple[str, ...] = ()) -> bytes:
    """The back-end's capability words less those the gateway cannot carry (``keep``
    exempts), as the text of a CAPABILITY code.  Back-ends answer every login with the same
    list, so this is worked out once per list, not once per login."""
    return " ".join(c for c in words
                    if c.upper() in keep or not c.upper().startswith(POSTAUTH_DROP)).encode()


def filter_capability_line(line: bytes, keep: tuple[str, ...] = ()) -> bytes:
    """A back-end's ``* CAPABILITY ...`` line as the client may see it (filter_capabilities)."""
    words = tuple(line[13:].decode("ascii", "replace").split())
    return b"* CAPABILITY " + filter_capabilities(words, keep) + b"\r\n"


@functools.lru_cache(maxsize=64)
def _parse_capabilities(text: str) -> tuple[tuple[str, ...], frozenset[str]]:
    return tuple(text.split()), frozenset(parser.capabilities(text))


# A back-end answers every login with the same lines (its greeting, the ID and LOGIN
# answers with their capability lists): each is parsed once per worker.  Only short status
# lines are kept (a frozen Response without a list in it may serve every session), at most
# MAX_CACHED of them (a full cache starts over: a back-end whose lines differ each time).
MAX_CACHED_LINE = 2048
MAX_CACHED = 256
_parsed: dict[bytes, Response] = {}


def _parse_line(line: bytes) -> Response:
    response = _parsed.get(line)
    if response is None:
        response = parser.parse_response([line])
        if response.args is None and len(line) <= MAX_CACHED_LINE:
            if len(_parsed) >= MAX_CACHED:
                _parsed.clear()
            _parsed[line] = response
    return response


_UNQUOTABLE = re.compile(rb"[^\x20-\x7e]")
MAX_QUOTED = 1000     # longer values go as literals


def quote_bytes(raw: bytes) -> bytes | None:
    """An IMAP quoted string (RFC 3501 §4.3) for printable ASCII, else None: CR, LF, NUL and
    8-bit bytes must travel as a literal."""
    if len(raw) > MAX_QUOTED or _UNQUOTABLE.search(raw):
        return None
    if b"\\" in raw or b'"' in raw:
        raw = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + raw + b'"'


def quoted(value: str) -> bytes | None:
    if len(value) <= MAX_QUOTED and value.isascii() and value.isprintable() and \
            '"' not in value and "\\" not in value:
        return b'"' + value.encode("ascii") + b'"'   # (most values: no regex, no escapes)
    return quote_bytes(value.encode("utf-8"))


_quoted_key = functools.lru_cache(maxsize=128)(quoted)   # ID keys: the same few each login


class BackendConnection:
    """One connection to an IMAP back-end, from its greeting on; after a successful
    gateway.imap.login it is the logged-in back-end the session relays to.

    ``target`` is where it leads (configuration and login name), ``name`` that back-end's
    name for logs, ``sock`` the socket (handed to a relay after login).
    """

    def __init__(self, sock, target: Target):
        self.sock = sock
        self.target = target
        self.name = target.config.name
        self.reader = ImapReader(sock, max_line=MAX_RESPONSE_LINE, max_literal=MAX_RESPONSE_LITERAL)
        # (no answer_due: session.connect returns once the greeting is readable)
        self.capabilities: frozenset[str] = frozenset()   # upper-cased, to test what is offered
        self.capability_words: tuple[str, ...] = ()       # as spelled, for the client
        self.capability_updates = 0                       # how many lists were received
        self.tag_counter = 0
        self.prefix = b""      # a pipelined command waiting to leave with the next write

    def fail(self, failure: Failure, detail: str) -> LoginError:
        return LoginError(failure, f"backend {self.name}: {detail}")

    # -- reading ------------------------------------------------------------------------------

    def next_event(self):
        """The next Line / LiteralChunk; any failure is a LoginError (UNAVAILABLE/PROTOCOL)."""
        try:
            return self.reader.next_event()
        except ReadError as exc:
            raise self.fail(Failure.UNAVAILABLE, str(exc)) from None
        except parser.ParseError as exc:
            raise self.fail(Failure.PROTOCOL, f"unparsable answer: {exc}") from None

    def read_response(self, wanted: tuple[bytes, ...] | None = None) -> Response | None:
        """One whole response (its literals collected; they are small during login).

        With ``wanted`` (upper-case line prefixes) any other response is read past and None
        returned, without the cost of tokenising it (an ID answer, say).
        """
        try:
            parts = self.reader.read_parts()
        except ReadError as exc:
            raise self.fail(Failure.UNAVAILABLE, str(exc)) from None
        except parser.ParseError as exc:
            raise self.fail(Failure.PROTOCOL, f"unparsable answer: {exc}") from None
        if wanted is not None and not parts[0][:16].upper().startswith(wanted):
            return None
        try:
            if len(parts) == 1:
                return _parse_line(parts[0])
            return parser.parse_response(parts)
        except parser.ParseError as exc:
            raise self.fail(Failure.PROTOCOL, f"unparsable answer: {exc}") from None

    def unbounded(self, idle_timeout: float) -> None:
        """After login: responses may carry literals of any size (they are streamed), and
        reads are bounded by the session's idle timeout, no longer by the login deadline."""
        self.reader.set_max_literal(None)
        self.reader.deadline = None
        self.reader.idle_timeout = idle_timeout

    def take_pending(self) -> bytes:
        """Bytes already read from the back-end but not consumed (forwarded to the client)."""
        return self.reader.leftover()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- writing ------------------------------------------------------------------------------

    def next_tag(self) -> str:
        self.tag_counter += 1
        return f"MG{self.tag_counter}"

    def send(self, data: bytes) -> None:
        """Write ``data`` after any pipelined prefix; a failure is a LoginError."""
        data, self.prefix = self.prefix + data, b""
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self.fail(Failure.UNAVAILABLE, f"write error: {exc.strerror or exc}") from None
        self.reader.answer_due = True

    def literal_plus(self) -> bool:
        return "LITERAL+" in self.capabilities

    def send_command(self, tag: str, name: str, args: list[bytes | str]) -> None:
        """Send ``tag name args...``: str args are literals, bytes args are sent verbatim.

        With LITERAL+ the whole command is one write; without it each literal waits for the
        back-end's continuation request.
        """
        plus = self.literal_plus()
        head = f"{tag} {name}".encode("ascii")
        for arg in args:
            if isinstance(arg, bytes):
                head += b" " + arg
                continue
            raw = arg.encode("utf-8")
            head += b" {%d%s}\r\n" % (len(raw), b"+" if plus else b"")
            if not plus:
                self.send(head)
                self.await_continuation(tag)
                head = b""
            head += raw
        self.send(head + b"\r\n")

    def await_continuation(self, tag: str) -> None:
        while True:
            response = self.read_response()
            if response.tag == "+":
                return
            if response.tag == tag:
                raise self.fail(Failure.PROTOCOL, f"refused a literal: {response.kind} {response.text}")

    def await_tagged(self, tag: str) -> Response:
        """Read until the tagged answer; untagged CAPABILITY data updates capabilities."""
        wanted = (tag.upper().encode() + b" ", b"* CAPABILITY ", b"* BYE")
        while True:
            response = self.read_response(wanted)
            if response is None:
                continue
            if response.tag == tag:
                if response.code and response.code.name == "CAPABILITY":
                    self.set_capabilities(response.code.text)
                return response
            if response.tag == "*" and response.kind == "CAPABILITY":
                self.set_capabilities(response.text)
            elif response.tag == "*" and response.kind == "BYE":
                raise self.fail(Failure.UNAVAILABLE, f"said BYE: {response.text}")

    def set_capabilities(self, text: str) -> None:
        self.capability_words, self.capabilities = _parse_capabilities(text)
        self.capability_updates += 1

    def refresh_capabilities(self) -> None:
        """Ask for the capability list (after login it may differ from the greeting's)."""
        tag = self.next_tag()
        self.send_command(tag, "CAPABILITY", [])
        self.await_tagged(tag)


def encode_id(fields: list[tuple[str, str]]) -> bytes:
    """An RFC 2971 ID parameter list; fields that cannot be quoted safely are dropped."""
    items = []
    for key, value in fields[:MAX_ID_FIELDS]:
        key_q, value_q = _quoted_key(key[:30]), quoted(value[:MAX_ID_VALUE])
        if key_q is not None and value_q is not None:
            items.append(key_q + b" " + value_q)
    return b"(" + b" ".join(items) + b")" if items else b"NIL"
