"""The client half of a POP3 session: pre-auth at the gateway, then a byte relay.

Before login the gateway answers CAPA, USER/PASS, AUTH PLAIN and LOGIN (RFC 5034, with
initial response and "*" cancel), QUIT and STLS itself; anything else gets -ERR.  After the
back-end's +OK the session is a plain byte relay: POP3 needs no parsing there.
"""
from __future__ import annotations

import logging
import re
import time

from gateway import sasl
from gateway import session as session_mod
from gateway.pop3 import login
from gateway.pop3.framer import LineFramer, TooLong
from gateway.session import ClientGone, Failure
from gateway.stream import DeadlineExceeded, PeerClosed, ReadError, ReadTimeout, StreamReader

log = logging.getLogger("mailgate.pop3")

MAX_COMMAND = 255          # RFC 2449 §4: command lines, CRLF included
MAX_AUTH_LINE = 8192       # RFC 5034 §4: SASL lines are not bound by the 255 octets
MAX_BAD_COMMANDS = 10
INACTIVITY = b"-ERR Disconnected for inactivity.\r\n"
TOO_SLOW = b"-ERR Disconnected: login took too long.\r\n"
READ_FAILURES = (
    (DeadlineExceeded, TOO_SLOW, "login deadline"),
    (ReadTimeout, INACTIVITY, "idle timeout before login"),
    (PeerClosed, b"", "client closed"),
)
# RFC 2449 CAPA before login: what a Dovecot back-end offers after it, so that clients
# deciding from it (TOP, UIDL) get it right; STLS is added on STARTTLS listeners.
PREAUTH_CAPA = ("TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "SASL PLAIN LOGIN",
                "USER", "IMPLEMENTATION mailgate")
_QUIT_LINE = re.compile(rb"\nQUIT *\r?\n", re.IGNORECASE)

ANSWERS = {
    Failure.AUTH_FAILED: b"-ERR [AUTH] Authentication failed.\r\n",
    Failure.UNAVAILABLE: b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n",
    Failure.PROTOCOL: b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n",
    Failure.LIMIT: b"-ERR [IN-USE] Too many connections for this user or address.\r\n",
    Failure.THROTTLED: b"-ERR [SYS/TEMP] Too many failed logins, try again later.\r\n",
}


class Pop3Session(session_mod.Session):
    protocol = "pop3"
    read_failures = READ_FAILURES

    def __init__(self, service, client, address, listen):
        super().__init__(service, client, address, listen)
        self.settings = service.config.pop3
        self.reader = self.new_reader(client)
        self.user = ""
        self.bad_commands = 0
        self.backend_greeting = b""

    def new_reader(self, client) -> StreamReader:
        """The pre-login reader (again after STLS: nothing read before survives)."""
        return StreamReader(client, LineFramer(MAX_AUTH_LINE), recv_size=4096,
                            on_bytes=self.count_in)

    def greeting(self) -> bytes:
        return b"+OK " + (self.settings.banner or "mailgate POP3 ready.").encode() + b"\r\n"

    def goodbye_line(self, text: str) -> bytes:
        return b"-ERR [SYS/TEMP] " + text.encode() + b"\r\n"

    internal_error_line = b"-ERR [SYS/TEMP] Internal error, closing connection.\r\n"

    def next_command(self) -> None:
        line = self.read_line()
        if line is None:
            self.err("Line too long.")   # RFC 2449 §4: refused, and the session goes on
            return
        self.dispatch(line)

    def count_in(self, size: int) -> None:
        self.bytes_in += size

    def read_line(self) -> bytes | None:
        """One client line without its line end; None when it was over MAX_AUTH_LINE
        (already dropped).  Time bounds and EOF end the session (ClientGone)."""
        try:
            event = self.reader.next_event()
        except ReadError as exc:
            raise self.read_failed(exc) from None
        return None if isinstance(event, TooLong) else event.text

    # -- commands ---------------------------------------------------------------------------------

    def dispatch(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        name = verb.decode("ascii", "replace").upper()
        if len(line) + 2 > MAX_COMMAND and name != "AUTH":
            self.err("Line too long.")
            return
        handler = getattr(self, f"cmd_{name}", None) if name.isalpha() else None
        if handler is None:
            self.err("Unknown command or not allowed before login.")
            return
        handler(argument.decode("utf-8", "replace"))

    def err(self, text: str) -> None:
        self.bad_commands += 1
        self.send(b"-ERR " + text.encode() + b"\r\n")
        if self.bad_commands >= MAX_BAD_COMMANDS:
            raise ClientGone("too many invalid commands")

    def cmd_CAPA(self, argument: str) -> None:
        lines = ["+OK Capability list follows", *PREAUTH_CAPA]
        if not self.login_allowed:   # RFC 2595 §4: no login mechanisms while they are refused
            lines = [line for line in lines if line != "USER" and not line.startswith("SASL")]
        if self.can_start_tls:
            lines.append("STLS")
        self.send("\r\n".join(lines + ["."]).encode() + b"\r\n")

    def cmd_QUIT(self, argument: str) -> None:
        self.send(b"+OK Logging out.\r\n")
        self.end("quit")
        self.closing = True

    def cmd_NOOP(self, argument: str) -> None:
        self.err("Not logged in.")

    def cmd_STLS(self, argument: str) -> None:
        if not self.can_start_tls:
            self.err("STLS is not available on this port.")
            return
        self.send(b"+OK Begin TLS negotiation.\r\n")
        # RFC 2595 §4: plaintext the client pipelined after STLS is dropped unread.
        self.start_tls()
        self.user = ""

    def refuse_cleartext(self) -> bool:
        """True (answered) when this login must wait for TLS."""
        if self.login_allowed:
            return False
        self.send(b"-ERR [AUTH] Plaintext authentication disallowed on non-secure "
                  b"connections; use STLS.\r\n")
        return True

    def cmd_USER(self, argument: str) -> None:
        if self.refuse_cleartext():
            return
        if not argument:
            self.err("USER needs a name.")
            return
        self.user = argument
        self.send(b"+OK\r\n")

    def cmd_PASS(self, argument: str) -> None:
        if self.refuse_cleartext():
            return
        if not self.user:
            self.err("No user name given.")
            return
        user, self.user = self.user, ""
        self.login(user, argument, "USER")

    def cmd_AUTH(self, argument: str) -> None:
        if self.refuse_cleartext():
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            self.send(b"+OK\r\n" + b"".join(m.encode() + b"\r\n" for m in sasl.MECHANISMS) +
                      b".\r\n")
            return
        if mechanism not in sasl.MECHANISMS:
            self.err("Unsupported authentication mechanism.")
            return
        try:
            found = sasl.exchange(mechanism, initial.encode("ascii", "replace") if initial else None,
                                  self.sasl_answer)
        except sasl.Malformed as exc:
            self.err(str(exc))
            return
        if found is not None:
            self.login(*found, mechanism)

    def sasl_answer(self, challenge: bytes) -> bytes | None:
        """Send a challenge, read the answer; None when already answered (cancel, too long)."""
        self.send(b"+ " + challenge + b"\r\n")
        line = self.read_line()
        if line is None:
            self.err("Line too long.")
            return None
        if line == b"*":
            self.err("Authentication cancelled.")
            return None
        return line

    # -- login ------------------------------------------------------------------------------------

    def open_backend(self, target, password: str, mechanism: str):
        connection, answer = login.open_backend(
            target, password, (self.client_address, self.client_port, self.id))
        self.backend_sock = connection.sock
        self.backend_name = connection.name
        return answer, connection.reader.leftover()

    def answer_success(self, result) -> None:
        answer, pending = result
        self.send(answer + b"\r\n")
        self.backend_pending = pending

    def answer_failure(self, failure: Failure) -> None:
        self.send(ANSWERS[failure])

    # -- after login ------------------------------------------------------------------------------

    backend_pending = b""
    quit_seen = False
    client_tail = b"\n"     # the end of what the client sent, to find QUIT across chunks

    def proxy(self) -> None:
        pending_up = self.reader.leftover()
        self.reader = None                       # pre-auth state is not kept for the session
        self.last_activity = time.monotonic()   # the idle clock starts at login
        self.hand_over(pending_up, self.backend_pending, self.watch_quit)

    def watch_quit(self, buffer, size: int) -> None:
        """Notes a QUIT line, so that the back-end closing after it is no error."""
        if not self.quit_seen:
            data = bytes(buffer[:size]) if size <= 512 else bytes(buffer[size - 512:size])
            self.quit_seen = bool(_QUIT_LINE.search(self.client_tail + data))
            self.client_tail = (self.client_tail + data[-8:])[-8:]

    def relay_ended(self, ending) -> None:
        """Before the relay closes: unless the client quit, tell it why the session ends."""
        if self.quit_seen and ending.side != "gateway":
            self.end("quit")
        elif not self.closing:
            if ending.reason == "idle timeout":
                self.try_send(INACTIVITY)   # RFC 1939 §3: the autologout timer
            elif ending.side == "backend" and not _is_goodbye(self.relay.tail):
                self.try_send(b"-ERR [SYS/TEMP] Connection to the mail server lost.\r\n")
        super().relay_ended(ending)


def _is_goodbye(chunk: bytes) -> bool:
    """Whether the back-end's last bytes were an -ERR line, as Dovecot's "-ERR [SYS/TEMP]
    Server shutting down." on a kick: the client has its answer, a second would confuse it."""
    if not chunk.endswith(b"\n"):
        return False
    last_line = chunk[:-1].rsplit(b"\n", 1)[-1]
    return last_line.startswith(b"-ERR")
