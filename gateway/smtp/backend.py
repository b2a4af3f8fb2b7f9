"""A connection to a back-end submission service: its replies (one StreamReader over the
reply framer), the lines the gateway sends, its EHLO extensions, XCLIENT and the replayed
AUTH.  The login sequence is gateway.smtp.login.

Every line sent here is built by the gateway: the EHLO name is ours, XCLIENT values are
address literals, numbers and xtext, and the credentials travel as one SASL PLAIN base64
token (RFC 4954 with an initial response), so nothing a client typed becomes a second command.
"""
from __future__ import annotations

import ipaddress

from gateway import sasl
from gateway.session import Failure, LoginError, Target
from gateway.smtp.framer import Reply, ReplyError, ReplyFramer
from gateway.stream import ReadError, StreamReader

# Replies to AUTH that mean "try again later" rather than "no".
_TEMPORARY_AUTH = {454}


class SmtpBackend:
    """One back-end submission connection up to and including the login."""

    def __init__(self, sock, target: Target, helo_name: str):
        self.sock = sock
        self.target = target
        self.name = target.config.name
        self.helo_name = helo_name
        self.reader = StreamReader(sock, ReplyFramer())
        self.extensions: dict[str, str] = {}      # EHLO keyword → its parameters

    def _fail(self, failure: Failure, detail: str) -> LoginError:
        return LoginError(failure, f"backend {self.name}: {detail}")

    def reply(self) -> Reply:
        """The next reply; LoginError when the back-end is slow, gone or not speaking SMTP."""
        try:
            return self.reader.next_event()
        except ReadError as exc:
            raise self._fail(Failure.UNAVAILABLE, str(exc)) from None
        except ReplyError as exc:
            raise self._fail(Failure.PROTOCOL, str(exc)) from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, line: bytes) -> None:
        try:
            self.sock.sendall(line)
        except OSError as exc:
            raise self._fail(Failure.UNAVAILABLE, f"write error: {exc.strerror or exc}") from None

    def expect(self, command: bytes, code: int, what: str) -> Reply:
        if command:
            self.send(command)
        answer = self.reply()
        if answer.code != code:
            raise self._fail(Failure.UNAVAILABLE, f"{what}: {answer.code} {answer.text[:80]!r}")
        return answer

    def greet(self) -> None:
        """Greeting and EHLO; then XCLIENT when offered (a new greeting and EHLO follow)."""
        self.expect(b"", 220, "greeting")
        self.ehlo()

    def ehlo(self) -> None:
        answer = self.expect(b"EHLO " + self.helo_name.encode("ascii") + b"\r\n", 250, "EHLO")
        self.extensions = {}
        for line in answer.lines[1:]:
            keyword, _, parameters = line.partition(" ")
            self.extensions[keyword.upper()] = parameters.upper()

    def forward_client(self, address: str, port: int, session_id: str,
                       login_name: str | None = None) -> bool:
        """XCLIENT (Postfix's XCLIENT_README; Dovecot offers it to login_trusted_networks):
        the back-end logs and checks the real client.  Only attributes the back-end lists
        are sent.  True when sent.  With ``login_name`` the back-end is told who logged in
        (``LOGIN=``, the password having been checked by the gateway): LoginError if it
        cannot take that."""
        offered = set(self.extensions.get("XCLIENT", "").split())
        if "XCLIENT" not in self.extensions or "ADDR" not in offered:
            if login_name is not None:
                raise self._fail(Failure.UNAVAILABLE, "submission_xclient_login but no XCLIENT")
            return False
        attributes = [f"ADDR={_xclient_address(address)}"]
        if login_name is not None:
            if "LOGIN" not in offered:
                raise self._fail(Failure.UNAVAILABLE, "XCLIENT without LOGIN")
            attributes.append(f"LOGIN={xtext(login_name)}")
        if "PORT" in offered and 0 < port < 65536:
            attributes.append(f"PORT={int(port)}")
        if "SESSION" in offered and session_id.replace(".", "").isalnum():
            attributes.append(f"SESSION={session_id}")
        self.expect(("XCLIENT " + " ".join(attributes) + "\r\n").encode("ascii"), 220, "XCLIENT")
        self.ehlo()
        return True

    def login(self, login_name: str, password: str) -> Reply:
        """AUTH PLAIN with the client's credentials; the 235 reply, else LoginError."""
        mechanisms = self.extensions.get("AUTH", "").split()
        if "PLAIN" not in mechanisms:
            raise self._fail(Failure.UNAVAILABLE, f"no AUTH PLAIN (offers {mechanisms})")
        self.send(b"AUTH PLAIN " + sasl.encode_plain(login_name, password) + b"\r\n")
        answer = self.reply()
        if answer.code == 235:
            return answer
        failure = Failure.UNAVAILABLE if answer.code in _TEMPORARY_AUTH or answer.kind == 4 \
            else Failure.AUTH_FAILED
        raise self._fail(failure, f"AUTH answer {answer.code} {answer.text[:80]!r}")

    def pending(self) -> bytes:
        """Bytes read past the login answer (the relay sends them on)."""
        return self.reader.leftover()


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+", "=" and octets outside 33..126 as "+XX" (XCLIENT values)."""
    return "".join(chr(octet) if 33 <= octet <= 126 and octet not in (0x2B, 0x3D)
                   else f"+{octet:02X}" for octet in value.encode("utf-8"))


def _xclient_address(address: str) -> str:
    """ADDR value: IPv4 as is, IPv6 with the ``IPV6:`` prefix; anything else [UNAVAILABLE]."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return "[UNAVAILABLE]"
    return f"IPV6:{parsed.compressed}" if parsed.version == 6 else parsed.compressed
