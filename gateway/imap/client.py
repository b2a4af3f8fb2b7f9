"""The client half of an IMAP session: the pre-auth dialogue at the gateway, then the relay.

Before login the gateway answers CAPABILITY, NOOP, LOGOUT, ID, LOGIN, AUTHENTICATE PLAIN and
LOGIN (RFC 4959 SASL-IR) and STARTTLS itself; every other command gets BAD.  A login is
routed (gateway.session.route), logged in at the back-end (gateway.imap.login, following
login referrals with gateway.imap.referrals.follow) and the back-end's answer returned under
the client's tag; from then on the session is relayed.
"""
from __future__ import annotations

import logging
import re

from gateway import sasl
from gateway import session as session_mod
from gateway.imap import login, parser, referrals
from gateway.imap.backend import filter_capabilities
from gateway.imap.parser import Atom, Line
from gateway.imap.reader import ImapReader, LiteralRefused, TooLarge
from gateway.imap.tracker import CapabilityFilter, CommandTracker
from gateway.session import ClientGone, Failure, LoginError
from gateway.stream import DeadlineExceeded, PeerClosed, ReadError, ReadTimeout

log = logging.getLogger("mailgate.imap")

PREAUTH_CAPABILITIES = b"IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN"
MAX_BAD_COMMANDS = 10      # then the connection is closed, as Dovecot does
MAX_ARGS = 64
PROXY_TTL = 5              # Dovecot's LOGIN_PROXY_TTL: proxies in a row before a loop is assumed
_LITERAL8 = re.compile(rb"~\{\d+\+?\}\r?\n\Z")

# A pre-login read that cannot go on → (the goodbye, the reason logged; "" = the error's text).
READ_FAILURES = (
    (DeadlineExceeded, b"* BYE Autologout; login took too long.\r\n", "login deadline"),
    (ReadTimeout, b"* BYE Autologout; idle for too long.\r\n", "idle timeout before login"),
    (PeerClosed, b"", "client closed"),
    (ReadError, b"", ""),
    (parser.LiteralTooLarge, b"* BYE [TOOBIG] Literal too large before login.\r\n", ""),
    (TooLarge, b"* BYE [TOOBIG] Command too large before login.\r\n", ""),
    (parser.LineTooLong, b"* BYE [TOOBIG] Command line too long.\r\n", ""),
    (parser.ParseError, b"* BYE Protocol error.\r\n", ""),
)

ANSWERS = {
    Failure.AUTH_FAILED: b"NO [AUTHENTICATIONFAILED] Authentication failed.",
    Failure.UNAVAILABLE: b"NO [UNAVAILABLE] Service temporarily unavailable, try again later.",
    Failure.PROTOCOL: b"NO [UNAVAILABLE] Service temporarily unavailable, try again later.",
    Failure.LIMIT: b"NO [LIMIT] Too many connections for this user or address.",
    Failure.THROTTLED: b"NO [LIMIT] Too many failed logins, try again later.",
}


class ImapSession(session_mod.Session):
    protocol = "imap"
    read_failures = READ_FAILURES

    def __init__(self, service, client, address, listen):
        super().__init__(service, client, address, listen)
        self.settings = service.config.imap
        self.reader = self.new_reader(client)
        self.client_id: list[tuple[str, str]] = []
        self.proxy_ttl = PROXY_TTL
        self.bad_commands = 0
        self.login_tag = ""

    def new_reader(self, client) -> ImapReader:
        """The pre-login reader (again after STARTTLS: nothing read before survives)."""
        # One pre-login command as a whole: two literals (user, password) and a line.
        max_total = 2 * self.settings.max_login_literal + self.settings.max_line
        return ImapReader(client, max_line=self.settings.max_line,
                          max_literal=self.settings.max_login_literal,
                          max_total=max_total, recv_size=4096, on_bytes=self.count_in)

    # -- the session's life -------------------------------------------------------------------

    def greeting(self) -> bytes:
        banner = self.settings.banner or "mailgate ready."
        return b"* OK [CAPABILITY " + self.capabilities() + b"] " + banner.encode() + b"\r\n"

    def capabilities(self) -> bytes:
        """RFC 3501 §6.2.1/§7.2.1: STARTTLS where it works; LOGINDISABLED (and no AUTH=)
        while a login would be refused for want of TLS."""
        words = PREAUTH_CAPABILITIES
        if self.can_start_tls:
            words += b" STARTTLS"
        if not self.login_allowed:
            words = b" ".join(w for w in words.split()
                              if not w.startswith(b"AUTH=") and w != b"SASL-IR")
            words += b" LOGINDISABLED"
        return words

    def next_command(self) -> None:
        parts = self.read_command()
        if parts is not None:
            self.dispatch(parts)

    def goodbye_line(self, text: str) -> bytes:
        return b"* BYE [UNAVAILABLE] " + text.encode() + b"\r\n"

    internal_error_line = b"* BYE [SERVERBUG] Internal error, closing connection.\r\n"

    # -- reading commands before login -------------------------------------------------------

    def count_in(self, size: int) -> None:
        self.bytes_in += size

    def read_command(self) -> list[bytes] | None:
        """The parts of one whole command (lines and literal payloads, in order), or None when
        it was answered already (a refused literal)."""
        try:
            return self.reader.read_parts(self.on_literal)
        except LiteralRefused as refused:
            self.bad(_guess_tag(refused.parts[0]), "literal8 is not allowed here.")
            return None
        except (ReadError, parser.ParseError) as exc:
            raise self.read_failed(exc) from None

    def on_literal(self, line: Line) -> bool:
        """A literal is announced: literal8 (RFC 3516) carries no credentials; "+" for the rest."""
        if _LITERAL8.search(line.data):
            return False
        if not line.literal.nonsync:
            self.send(b"+ Ready for literal data.\r\n")
        return True

    def next_line(self) -> Line:
        """One line (a SASL answer); read failures end the session with an answer."""
        try:
            event = self.reader.next_event()
        except (ReadError, parser.ParseError) as exc:
            raise self.read_failed(exc) from None
        if not isinstance(event, Line):      # cannot happen between commands
            raise ClientGone("protocol error: literal data out of place")
        return event

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

    def reply(self, tag: str, text: str, untagged: bytes = b"", after: bytes = b"") -> None:
        """The tagged answer, with the untagged lines that go before or after it in the same
        write (one send, one wake-up of the client, as a server answers in one buffer)."""
        self.send(untagged + tag.encode() + b" " + text.encode() + b"\r\n" + after)

    def bad(self, tag: str, text: str) -> None:
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self.reply(tag, f"BAD {text}", after=b"* BYE Too many invalid IMAP commands.\r\n")
            raise ClientGone("too many invalid commands")
        self.reply(tag, f"BAD {text}")

    def cmd_CAPABILITY(self, command) -> None:
        self.reply(command.tag,
                   "OK Pre-login capabilities listed, post-login capabilities have more.",
                   untagged=b"* CAPABILITY " + self.capabilities() + b"\r\n")

    def cmd_NOOP(self, command) -> None:
        self.reply(command.tag, "OK NOOP completed.")

    def cmd_LOGOUT(self, command) -> None:
        self.reply(command.tag, "OK Logout completed.", untagged=b"* BYE Logging out\r\n")
        self.end("logout")
        self.closing = True

    def cmd_STARTTLS(self, command) -> None:
        if not self.can_start_tls:
            self.bad(command.tag, "STARTTLS is not available on this port.")
            return
        self.reply(command.tag, "OK Begin TLS negotiation now.")
        # Whatever the client pipelined in clear text is dropped unread: it must not run
        # as if it had come over TLS (the STARTTLS command injection of CVE-2011-0411).
        self.start_tls()

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
            self.proxy_ttl = _proxy_ttl(self.client_id, self.proxy_ttl)
        elif not _is_nil(fields):
            self.bad(command.tag, "ID argument must be a list or NIL.")
            return
        self.reply(command.tag, "OK ID completed.", untagged=b'* ID ("name" "mailgate")\r\n')

    def refuse_cleartext(self, tag: str) -> bool:
        """True (answered) when this login must wait for TLS."""
        if self.login_allowed:
            return False
        self.reply(tag, "NO [PRIVACYREQUIRED] Plaintext authentication disallowed on "
                        "non-secure connections; use STARTTLS.")
        return True

    def cmd_LOGIN(self, command) -> None:
        if self.refuse_cleartext(command.tag):
            return
        args = command.args
        if len(args) != 2 or isinstance(args[0], list) or isinstance(args[1], list):
            self.bad(command.tag, "LOGIN needs a user name and a password.")
            return
        self.login_command(command.tag, _text(args[0]), _text(args[1]), "LOGIN")

    def cmd_AUTHENTICATE(self, command) -> None:
        if self.refuse_cleartext(command.tag):
            return
        args = command.args
        if not args or len(args) > 2 or not isinstance(args[0], Atom):
            self.bad(command.tag, "AUTHENTICATE needs a mechanism.")
            return
        mechanism = args[0].upper()
        if mechanism not in sasl.MECHANISMS:
            self.reply(command.tag, "NO Unsupported authentication mechanism.")
            return
        initial = _text(args[1]).encode() if len(args) == 2 else None   # RFC 4959 SASL-IR
        try:
            found = sasl.exchange(mechanism, initial,
                                  lambda challenge: self.sasl_answer(command.tag, challenge))
        except sasl.Malformed as exc:
            self.bad(command.tag, str(exc))
            return
        if found is not None:
            self.login_command(command.tag, *found, mechanism)

    def sasl_answer(self, tag: str, challenge: bytes) -> bytes | None:
        """Send a challenge and read the client's answer line; None when the client cancelled
        with "*" (RFC 3501 6.2.2), already answered BAD."""
        self.send(b"+ " + challenge + b"\r\n")
        line = self.next_line()
        if line.literal is not None:
            # A literal cannot answer a challenge; its payload may be on its way: say why, close.
            self.try_send(tag.encode() + b" BAD SASL response must be a line.\r\n"
                          b"* BYE Protocol error.\r\n")
            raise ClientGone("protocol error: literal as a SASL response")
        answer = line.data.rstrip(b"\r\n")
        if answer == b"*":
            self.bad(tag, "Authentication cancelled.")
            return None
        return answer

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

    def open_backend(self, target, password: str, mechanism: str):
        """Log in at ``target``, following login referrals; (connection, answer)."""
        if self.proxy_ttl <= 1:
            raise LoginError(Failure.UNAVAILABLE, "proxy TTL reached zero: proxies are looping")
        credentials = login.Credentials(password, mechanism)
        id_fields = self.id_fields()
        connection, answer = referrals.follow(
            target, lambda there: login.open_backend(there, credentials, id_fields),
            self.service.referral_policy, self.id)
        self.backend_sock = connection.sock
        self.backend_name = connection.name
        self.backend_login_name = connection.target.login_name
        return connection, answer

    def answer_success(self, result) -> None:
        connection, answer = result
        self.home = connection
        capabilities = filter_capabilities(connection.capability_words, self.capabilities_kept())
        text = answer.text or "Logged in"
        self.send(self.login_tag.encode() + b" OK [CAPABILITY " + capabilities +
                  b"] " + text.encode("utf-8", "replace") + b"\r\n")
        self.backend_pending = connection.take_pending()

    def capabilities_kept(self) -> tuple[str, ...]:
        """Back-end capabilities shown although the gateway handles them (README: referrals)."""
        return ("MAILBOX-REFERRALS",) if self.service.config.referrals.pass_to_capable_clients else ()

    def answer_failure(self, failure: Failure) -> None:
        self.send(self.login_tag.encode() + b" " + ANSWERS[failure] + b"\r\n")

    def id_fields(self) -> list[tuple[str, str]]:
        """The client's ID plus its address, for the back-end's logs (Dovecot x-* fields)."""
        local = session_mod.local_address(self.listen, self.client)
        ours = [("x-originating-ip", self.client_address),
                ("x-originating-port", str(self.client_port)),
                ("x-connected-ip", str(local[0])), ("x-connected-port", str(local[1])),
                ("x-session-ext-id", self.id), ("x-proxy-ttl", str(self.proxy_ttl - 1))]
        theirs = [(k, v) for k, v in self.client_id if not k.lower().startswith("x-")]
        return theirs[:30 - len(ours)] + ours

    # -- after login ---------------------------------------------------------------------------

    def proxy(self) -> None:
        if self.credentials is not None:
            self.proxy_with_referrals()
            return
        self.tracker = CommandTracker()
        pending_up = self.reader.leftover()
        self.reader = None                      # pre-auth state is not kept for the session
        self.hand_over(pending_up, self.backend_pending, self.tracker.observe,
                       CapabilityFilter(self.tracker, self.capabilities_kept()))

    def proxy_with_referrals(self) -> None:
        """The home back-end may refer mailboxes elsewhere: the routing relay follows them."""
        from gateway.imap.routing import RoutingRelay
        password, mechanism = self.credentials
        self.credentials = None
        pending_up = self.reader.leftover()
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


def _proxy_ttl(client_id: list[tuple[str, str]], current: int) -> int:
    """The TTL another proxy in front of us sent (``x-proxy-ttl``), never raised above ours."""
    for key, value in client_id:
        if key.lower() == "x-proxy-ttl" and value.strip().isdigit():
            return min(int(value), current)
    return current


def _is_nil(token) -> bool:
    return isinstance(token, Atom) and token.upper() == "NIL"

