"""The client half of an IMAP session: the pre-auth dialogue at the gateway, then the relay.

Before login the gateway answers CAPABILITY, NOOP, LOGOUT, ID, LOGIN, AUTHENTICATE PLAIN
(RFC 4959 SASL-IR) and STARTTLS itself; every other command gets BAD.  A login is routed
(gateway.session.route), replayed to the back-end (gateway.imap.backend) and the back-end's
answer returned under the client's tag; from then on the session is relayed.
"""
from __future__ import annotations

import logging
import socket
from collections import deque

from gateway import sasl
from gateway import session as session_mod
from gateway.imap import parser, referrals
from gateway.imap.backend import ImapBackend, filter_capabilities
from gateway.imap.parser import Atom, Framer, Line
from gateway.imap.relay import CommandTracker
from gateway.session import ClientGone, Failure

log = logging.getLogger("mailgate.imap")

PREAUTH_CAPABILITIES = b"IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN"
MAX_BAD_COMMANDS = 10      # then the connection is closed, as Dovecot does
MAX_ARGS = 64

ANSWERS = {
    Failure.AUTH_FAILED: b"NO [AUTHENTICATIONFAILED] Authentication failed.",
    Failure.UNAVAILABLE: b"NO [UNAVAILABLE] Service temporarily unavailable, try again later.",
    Failure.PROTOCOL: b"NO [UNAVAILABLE] Service temporarily unavailable, try again later.",
}


class ImapSession(session_mod.Session):
    protocol = "imap"

    def __init__(self, service, client, address, listen):
        super().__init__(service, client, address, listen)
        self.settings = service.config.imap
        self.framer = Framer(max_line=self.settings.max_line,
                             max_literal=self.settings.max_login_literal)
        self.events: deque = deque()
        self.client_id: list[tuple[str, str]] = []
        self.bad_commands = 0
        self.login_tag = ""

    # -- the session's life -------------------------------------------------------------------

    def greeting(self) -> bytes:
        banner = self.settings.banner or "mailgate ready."
        return b"* OK [CAPABILITY " + PREAUTH_CAPABILITIES + b"] " + banner.encode() + b"\r\n"

    def next_command(self) -> None:
        self.dispatch(self.read_command())

    def goodbye_line(self, text: str) -> bytes:
        return b"* BYE [UNAVAILABLE] " + text.encode() + b"\r\n"

    internal_error_line = b"* BYE [SERVERBUG] Internal error, closing connection.\r\n"

    # -- reading commands before login -------------------------------------------------------

    def next_event(self):
        while not self.events:
            try:
                data = self.client.recv(4096)
            except socket.timeout:
                self.try_send(b"* BYE Autologout; idle for too long.\r\n")
                raise ClientGone("idle timeout before login") from None
            except OSError as exc:
                raise ClientGone(f"read error: {exc.strerror or exc}") from None
            if not data:
                raise ClientGone("client closed")
            self.bytes_in += len(data)
            try:
                self.events.extend(self.framer.feed(data))
            except parser.LiteralTooLarge:
                self.try_send(b"* BYE [TOOBIG] Literal too large before login.\r\n")
                raise ClientGone("literal too large") from None
            except parser.LineTooLong:
                self.try_send(b"* BYE [TOOBIG] Command line too long.\r\n")
                raise ClientGone("line too long") from None
            except parser.ParseError as exc:
                self.try_send(b"* BYE Protocol error.\r\n")
                raise ClientGone(f"protocol error: {exc}") from None
        return self.events.popleft()

    def read_command(self) -> list[bytes]:
        """The parts of one whole command: lines and literal payloads, in order."""
        parts: list[bytes] = []
        while True:
            event = self.next_event()
            if not isinstance(event, Line):
                continue  # a literal chunk outside a literal cannot happen; ignore defensively
            parts.append(event.data)
            if event.literal is None:
                return parts
            if not event.literal.nonsync:
                self.send(b"+ Ready for literal data.\r\n")
            payload = bytearray()
            while True:
                chunk = self.next_event()
                payload += chunk.data
                if chunk.last:
                    break
            parts.append(bytes(payload))

    def leftover(self) -> bytes:
        """Client bytes read but not consumed before login: pipelined after the LOGIN."""
        return b"".join(e.data for e in self.events) + self.framer.pending()

    # -- dispatch ----------------------------------------------------------------------------------

    def dispatch(self, parts: list[bytes]) -> None:
        try:
            command = parser.parse_command(parts, max_args=MAX_ARGS)
        except parser.ParseError as exc:
            self.bad(_guess_tag(parts[0]), f"Error in IMAP command: {exc}")
            return
        handler = getattr(self, f"cmd_{command.name}", None)
        if handler is None:
            self.bad(command.tag, "Command unknown or not allowed before login.")
            return
        handler(command)

    def reply(self, tag: str, text: str) -> None:
        self.send(tag.encode() + b" " + text.encode() + b"\r\n")

    def bad(self, tag: str, text: str) -> None:
        self.bad_commands += 1
        self.reply(tag, f"BAD {text}")
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self.send(b"* BYE Too many invalid IMAP commands.\r\n")
            raise ClientGone("too many invalid commands")

    def cmd_CAPABILITY(self, command) -> None:
        self.send(b"* CAPABILITY " + PREAUTH_CAPABILITIES + b"\r\n")
        self.reply(command.tag, "OK Pre-login capabilities listed, post-login capabilities have more.")

    def cmd_NOOP(self, command) -> None:
        self.reply(command.tag, "OK NOOP completed.")

    def cmd_LOGOUT(self, command) -> None:
        self.send(b"* BYE Logging out\r\n")
        self.reply(command.tag, "OK Logout completed.")
        self.end("logout")
        self.closing = True

    def cmd_STARTTLS(self, command) -> None:
        # The TLS listener mode wires this in gateway.tls; a plain listener has no STARTTLS.
        self.bad(command.tag, "STARTTLS is not available on this port.")

    def cmd_ID(self, command) -> None:
        """RFC 2971: answer with our own (minimal) ID; keep the client's for the back-end."""
        if len(command.args) != 1:
            self.bad(command.tag, "ID needs one argument.")
            return
        fields = command.args[0]
        if isinstance(fields, list):
            if len(fields) % 2:
                self.bad(command.tag, "ID list must hold field/value pairs.")
                return
            self.client_id = [(_text(k), _text(v)) for k, v in zip(fields[::2], fields[1::2])
                              if not _is_nil(k) and not _is_nil(v)][:30]
        elif not _is_nil(fields):
            self.bad(command.tag, "ID argument must be a list or NIL.")
            return
        self.send(b'* ID ("name" "mailgate")\r\n')
        self.reply(command.tag, "OK ID completed.")

    def cmd_LOGIN(self, command) -> None:
        if len(command.args) != 2 or any(isinstance(a, list) for a in command.args):
            self.bad(command.tag, "LOGIN needs a user name and a password.")
            return
        self.login_command(command.tag, _text(command.args[0]), _text(command.args[1]), "LOGIN")

    def cmd_AUTHENTICATE(self, command) -> None:
        args = command.args
        if not args or len(args) > 2 or not isinstance(args[0], Atom):
            self.bad(command.tag, "AUTHENTICATE needs a mechanism.")
            return
        if args[0].upper() != "PLAIN":
            self.reply(command.tag, "NO Unsupported authentication mechanism.")
            return
        if len(args) == 2:
            response = _text(args[1]).encode()   # RFC 4959 initial response; "=" is empty
        else:
            self.send(b"+ \r\n")
            response = self.read_sasl_line()
            if response is None:
                self.bad(command.tag, "Authentication cancelled.")
                return
        credentials = sasl.decode_plain(response)   # RFC 4959's "=" (empty) is malformed too
        if credentials is None:
            self.bad(command.tag, "Invalid SASL PLAIN response.")
            return
        authzid, authcid, password = credentials
        self.login_command(command.tag, sasl.login_identity(authzid, authcid), password, "PLAIN")

    def read_sasl_line(self) -> bytes | None:
        """One SASL continuation line; None when the client cancels with "*" (RFC 3501 6.2.2)."""
        event = self.next_event()
        if not isinstance(event, Line) or event.literal is not None:
            raise ClientGone("protocol error in SASL response")
        line = event.data.rstrip(b"\r\n")
        return None if line == b"*" else line

    # -- login -------------------------------------------------------------------------------------

    def login_command(self, tag: str, login_name: str, password: str, mechanism: str) -> None:
        self.login_tag = tag
        try:
            if self.login(login_name, password, mechanism) and self.follows_mailbox_referrals():
                # RFC 2193: referred mailboxes are opened with the same credentials, so they
                # stay in this session's memory (never logged) until it ends.
                self.credentials = (password, mechanism)
        except session_mod.TooManyFailures:
            self.send(b"* BYE Too many login failures.\r\n")
            raise

    def follows_mailbox_referrals(self) -> bool:
        return (self.service.config.referrals.follow and self.home is not None
                and "MAILBOX-REFERRALS" in self.home.capabilities)

    def login_routed(self, found, password: str, mechanism: str):
        first = session_mod.Target(found.backend, found.backend_login)
        return referrals.follow_login(self, first, password, mechanism)

    def backend_login(self, target, password: str, mechanism: str):
        self.backend_login_name = target.login_name
        backend = ImapBackend(self.backend, target.backend.name, target.backend.connect_timeout)
        backend.greet()
        self.backend.settimeout(target.backend.login_timeout)
        try:
            answer = backend.login(target.login_name, password, mechanism, self.id_fields())
        except referrals.Referred as referred:
            if referred.kept is not None:
                referred.kept = (backend, referred.kept)
            raise
        return backend, answer

    def answer_success(self, result) -> None:
        backend, answer = result
        self.home = backend
        keep = ("MAILBOX-REFERRALS",) if self.service.config.referrals.pass_to_capable_clients else ()
        capabilities = filter_capabilities(backend.capability_words, keep)
        text = answer.text or "Logged in"
        self.send(self.login_tag.encode() + b" OK [CAPABILITY " + capabilities +
                  b"] " + text.encode("utf-8", "replace") + b"\r\n")
        self.backend_pending = backend.leftover()

    def answer_failure(self, failure: Failure) -> None:
        self.send(self.login_tag.encode() + b" " + ANSWERS[failure] + b"\r\n")

    def id_fields(self) -> list[tuple[str, str]]:
        """The client's ID plus its address, for the back-end's logs (Dovecot x-* fields)."""
        local = self.client.getsockname()
        ours = [("x-originating-ip", self.client_address),
                ("x-originating-port", str(self.client_port)),
                ("x-connected-ip", str(local[0])), ("x-connected-port", str(local[1])),
                ("x-session-ext-id", self.id)]
        theirs = [(k, v) for k, v in self.client_id if not k.lower().startswith("x-")]
        return theirs[:30 - len(ours)] + ours

    # -- after login ---------------------------------------------------------------------------

    def proxy(self) -> None:
        if self.credentials is not None:
            self.proxy_with_referrals()
            return
        self.tracker = CommandTracker()
        pending_up = self.leftover()
        self.events = self.framer = None        # pre-auth state is not kept for the session
        self.hand_over(pending_up, self.backend_pending, self.tracker.observe)

    def proxy_with_referrals(self) -> None:
        """The home back-end may refer mailboxes elsewhere: the routing relay follows them."""
        from gateway.imap.routing import RoutingRelay
        password, mechanism = self.credentials
        self.credentials = None
        pending_up = self.leftover()
        self.events.clear()
        relay = RoutingRelay(self, self.home, password, mechanism)
        self.end(relay.run(pending_up, self.backend_pending))

    def relay_ended(self, ending) -> None:
        """Before the relay closes: an IMAP goodbye unless the client already has one."""
        if not self.closing:
            if ending.side == "backend":
                if not self.tracker.logout and b"* BYE" not in self.relay.tail:
                    self.try_send(b"* BYE [UNAVAILABLE] Connection to the mail server lost.\r\n")
            elif ending.reason == "idle timeout":
                self.try_send(b"* BYE Autologout; idle for too long.\r\n")
        super().relay_ended(ending)

    backend_pending = b""
    tracker = None
    credentials = None
    home = None
    backend_login_name = ""


def _guess_tag(line: bytes) -> str:
    tag = line.split(b" ", 1)[0].strip()
    if tag and len(tag) <= 64 and all(0x21 <= b <= 0x7e and b not in b'(){%*"\\+' for b in tag):
        return tag.decode("ascii")
    return "*"


def _text(token) -> str:
    if isinstance(token, bytes):
        return token.decode("utf-8", "replace")
    return str(token)


def _is_nil(token) -> bool:
    return isinstance(token, Atom) and token.upper() == "NIL"

