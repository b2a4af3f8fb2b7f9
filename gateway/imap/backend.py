"""The back-end half of an IMAP login: greeting, ID, the replayed login.

Every command sent here is built by the gateway.  Credentials always travel as literals
(``{n+}`` when the back-end offers LITERAL+, synchronising ``{n}`` otherwise, as nginx's mail
proxy does), so nothing a client typed can end one command and start another.
"""
from __future__ import annotations

import functools
import re
import socket
from collections import deque

from gateway import sasl
from gateway.imap import parser, referrals
from gateway.imap.parser import Framer, Line, LiteralChunk, Response
from gateway.session import Failure, LoginError

MAX_RESPONSE_LINE = 65536
MAX_RESPONSE_LITERAL = 1 << 20   # a literal in a login-phase response (ID values, etc.)
MAX_ID_FIELDS = 30               # RFC 2971 §3.3
MAX_ID_VALUE = 1024

# Tagged NO/BAD answer codes (RFC 5530) → how the login failed.  Anything not listed is an
# authentication failure: the client must not learn more than "failed" about a login.
NO_CODES = {
    "UNAVAILABLE": Failure.UNAVAILABLE,
    "SERVERBUG": Failure.UNAVAILABLE,
    "LIMIT": Failure.UNAVAILABLE,
    "INUSE": Failure.UNAVAILABLE,
    "CONTACTADMIN": Failure.AUTH_FAILED,
    "AUTHENTICATIONFAILED": Failure.AUTH_FAILED,
    "AUTHORIZATIONFAILED": Failure.AUTH_FAILED,
    "EXPIRED": Failure.AUTH_FAILED,
    "PRIVACYREQUIRED": Failure.AUTH_FAILED,
}

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


@functools.lru_cache(maxsize=64)
def _parse_capabilities(text: str) -> tuple[tuple[str, ...], frozenset[str]]:
    return tuple(text.split()), frozenset(parser.capabilities(text))


_UNQUOTABLE = re.compile(rb"[^\x20-\x7e]")


def quote_bytes(raw: bytes) -> bytes | None:
    """An IMAP quoted string (RFC 3501 §4.3) for printable ASCII, else None: CR, LF, NUL and
    8-bit bytes must travel as a literal."""
    if len(raw) > 1000 or _UNQUOTABLE.search(raw):
        return None
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def quoted(value: str) -> bytes | None:
    return quote_bytes(value.encode("utf-8"))


class ImapBackend:
    """A connection to one back-end during login; ``sock`` is handed to the relay after."""

    def __init__(self, sock: socket.socket, name: str, timeout: float):
        self.sock = sock
        self.name = name
        self.timeout = timeout
        self.framer = Framer(max_line=MAX_RESPONSE_LINE, max_literal=MAX_RESPONSE_LITERAL)
        self.events: deque = deque()
        self.capabilities: frozenset[str] = frozenset()   # upper-cased, to test what is offered
        self.capability_words: tuple[str, ...] = ()       # as spelled, for the client
        self.tag_counter = 0
        self.prefix = b""      # a pipelined command waiting to leave with the next write
        sock.settimeout(timeout)

    # -- reading ------------------------------------------------------------------------------

    def _fail(self, failure: Failure, detail: str) -> LoginError:
        return LoginError(failure, f"backend {self.name}: {detail}")

    def _next_event(self):
        while not self.events:
            try:
                data = self.sock.recv(16384)
            except socket.timeout:
                raise self._fail(Failure.UNAVAILABLE, "timed out") from None
            except OSError as exc:
                raise self._fail(Failure.UNAVAILABLE, f"read error: {exc.strerror or exc}") from None
            if not data:
                raise self._fail(Failure.UNAVAILABLE, "closed the connection")
            try:
                self.events.extend(self.framer.feed(data))
            except parser.ParseError as exc:
                raise self._fail(Failure.PROTOCOL, f"unparsable answer: {exc}") from None
        return self.events.popleft()

    def read_response(self, wanted: tuple[bytes, ...] | None = None) -> Response | None:
        """One whole response (its literals collected; they are small during login).

        With ``wanted`` (upper-case line prefixes) any other response is read past and None
        returned, without the cost of tokenising it (an ID answer, say).
        """
        parts: list[bytes] = []
        while True:
            event = self._next_event()
            if isinstance(event, Line):
                parts.append(event.data)
                if event.literal is None:
                    break
                payload = bytearray()
                while True:
                    chunk = self._next_event()
                    assert isinstance(chunk, LiteralChunk)
                    payload += chunk.data
                    if chunk.last:
                        break
                parts.append(bytes(payload))
        if wanted is not None and not parts[0][:16].upper().startswith(wanted):
            return None
        try:
            return parser.parse_response(parts)
        except parser.ParseError as exc:
            raise self._fail(Failure.PROTOCOL, f"unparsable answer: {exc}") from None

    def unbounded(self) -> None:
        """After login: responses may carry literals of any size (they are streamed)."""
        self.framer = Framer(max_line=MAX_RESPONSE_LINE, max_literal=None)

    def leftover(self) -> bytes:
        """Bytes already read from the back-end but not consumed (forwarded to the client)."""
        return b"".join(e.data for e in self.events) + self.framer.pending()

    # -- writing ------------------------------------------------------------------------------

    def next_tag(self) -> str:
        self.tag_counter += 1
        return f"MG{self.tag_counter}"

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._fail(Failure.UNAVAILABLE, f"write error: {exc.strerror or exc}") from None

    def _literal_plus(self) -> bool:
        return "LITERAL+" in self.capabilities

    def send_command(self, tag: str, name: str, args: list[bytes | str]) -> None:
        """Send ``tag name args...``: str args are literals, bytes args are sent verbatim.

        With LITERAL+ the whole command is one write; without it each literal waits for the
        back-end's continuation request.
        """
        self._send(self.prefix + self.encode_command(tag, name, args))
        self.prefix = b""

    def encode_command(self, tag: str, name: str, args: list[bytes | str]) -> bytes:
        """The command as bytes when it needs no continuation (LITERAL+); else sends it in
        steps, waiting for each "+", and returns the last piece."""
        plus = self._literal_plus()
        head = f"{tag} {name}".encode("ascii")
        for arg in args:
            if isinstance(arg, bytes):
                head += b" " + arg
                continue
            raw = arg.encode("utf-8")
            head += b" {%d%s}\r\n" % (len(raw), b"+" if plus else b"")
            if not plus:
                self._send(self.prefix + head)
                self.prefix = b""
                self._await_continuation(tag)
                head = b""
            head += raw
        return head + b"\r\n"

    def _await_continuation(self, tag: str) -> None:
        while True:
            response = self.read_response()
            if response.tag == "+":
                return
            if response.tag == tag:
                raise self._fail(Failure.PROTOCOL, f"refused a literal: {response.kind} {response.text}")

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
                raise self._fail(Failure.UNAVAILABLE, f"said BYE: {response.text}")

    def set_capabilities(self, text: str) -> None:
        self.capability_words, self.capabilities = _parse_capabilities(text)

    # -- the login sequence -----------------------------------------------------------------

    def greet(self) -> None:
        """Read the greeting: OK goes on, BYE is unavailable, PREAUTH is refused."""
        greeting = self.read_response()
        if greeting.tag != "*" or greeting.kind not in ("OK", "BYE", "PREAUTH"):
            raise self._fail(Failure.PROTOCOL, f"bad greeting {greeting.kind}")
        if greeting.kind == "BYE":
            referral = referrals.referral_of(greeting)
            if referral:   # RFC 2221 §4.2: "* BYE [REFERRAL ...]" instead of a greeting
                raise referrals.Referred(f"backend {self.name}: greeting referral", referral)
            raise self._fail(Failure.UNAVAILABLE, f"greeting BYE: {greeting.text}")
        if greeting.kind == "PREAUTH":
            raise self._fail(Failure.PROTOCOL, "greeting PREAUTH: a back-end must ask for a login")
        if greeting.code and greeting.code.name == "CAPABILITY":
            self.set_capabilities(greeting.code.text)
        else:
            tag = self.next_tag()
            self.send_command(tag, "CAPABILITY", [])
            self.await_tagged(tag)

    def login(self, login_name: str, password: str, mechanism: str,
              id_fields: list[tuple[str, str]]) -> Response:
        """Send ID (when offered) and the login; returns the tagged OK or raises LoginError."""
        id_tag = None
        use_plain = mechanism == "PLAIN" or "LOGINDISABLED" in self.capabilities
        pipelined = self._literal_plus() and (not use_plain or "SASL-IR" in self.capabilities)
        if "ID" in self.capabilities and id_fields:
            id_tag = self.next_tag()
            # Pipelined, ID and the login leave in one write (one round trip, one segment).
            self.prefix = f"{id_tag} ID ".encode() + encode_id(id_fields) + b"\r\n"
            if not pipelined:
                self._send(self.prefix)
                self.prefix = b""
                self.await_tagged(id_tag)
                id_tag = None
        tag = self.next_tag()
        if use_plain and "AUTH=PLAIN" in self.capabilities:
            self._send_plain(tag, login_name, password)
        elif "LOGINDISABLED" in self.capabilities:
            raise self._fail(Failure.UNAVAILABLE, "LOGINDISABLED and no AUTH=PLAIN")
        else:
            self.send_command(tag, "LOGIN", [login_name, password])
        if id_tag:
            self.await_tagged(id_tag)
        answer = self.await_tagged(tag)
        referral = referrals.referral_of(answer)
        if referral and answer.kind in ("OK", "NO"):
            # RFC 2221 §4.1: NO = log in there instead; OK = logged in, but prefer there.
            raise referrals.Referred(f"backend {self.name}: login referral ({answer.kind})",
                                     referral, kept=answer if answer.kind == "OK" else None)
        if answer.kind == "OK":
            return answer
        code = answer.code.name if answer.code else ""
        failure = NO_CODES.get(code, Failure.AUTH_FAILED)
        raise self._fail(failure, f"login answer {answer.kind} [{code}] {answer.text}")

    def _send_plain(self, tag: str, login_name: str, password: str) -> None:
        token = sasl.encode_plain(login_name, password)
        if "SASL-IR" in self.capabilities:
            self._send(self.prefix + f"{tag} AUTHENTICATE PLAIN ".encode() + token + b"\r\n")
            self.prefix = b""
            return
        self._send(f"{tag} AUTHENTICATE PLAIN\r\n".encode())
        self._await_continuation(tag)
        self._send(token + b"\r\n")


def encode_id(fields: list[tuple[str, str]]) -> bytes:
    """An RFC 2971 ID parameter list; fields that cannot be quoted safely are dropped."""
    items = []
    for key, value in fields[:MAX_ID_FIELDS]:
        key_q, value_q = quoted(key[:30]), quoted(value[:MAX_ID_VALUE])
        if key_q is not None and value_q is not None:
            items.append(key_q + b" " + value_q)
    return b"(" + b" ".join(items) + b")" if items else b"NIL"
