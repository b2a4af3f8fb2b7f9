"""The client half of a POP3 session: pre-auth at the gateway, then a byte relay.

Before login the gateway answers CAPA, USER/PASS, AUTH PLAIN (RFC 5034, with initial
response and "*" cancel), QUIT and STLS itself; anything else gets -ERR.  After the
back-end's +OK the session is a plain byte relay: POP3 needs no parsing there.
"""
from __future__ import annotations

import logging
import re
import socket
import time

from gateway import sasl
from gateway import session as session_mod
from gateway.pop3.backend import LineReader, LineTooLong, Pop3Backend
from gateway.session import ClientGone, Failure

log = logging.getLogger("mailgate.pop3")

MAX_COMMAND = 255          # RFC 2449 §4: command lines, CRLF included
MAX_AUTH_LINE = 8192       # RFC 5034 §4: SASL lines are not bound by the 255 octets
MAX_BAD_COMMANDS = 10
INACTIVITY = b"-ERR Disconnected for inactivity.\r\n"
_QUIT_LINE = re.compile(rb"\nQUIT *\r?\n", re.IGNORECASE)

ANSWERS = {
    Failure.AUTH_FAILED: b"-ERR [AUTH] Authentication failed.\r\n",
    Failure.UNAVAILABLE: b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n",
    Failure.PROTOCOL: b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n",
}


class Pop3Session(session_mod.Session):
    protocol = "pop3"

    def __init__(self, service, client, address, listen):
        super().__init__(service, client, address, listen)
        self.settings = service.config.pop3
        self.reader = LineReader(client, MAX_AUTH_LINE)
        self.user = ""
        self.bad_commands = 0
        self.backend_greeting = b""

    def greeting(self) -> bytes:
        return b"+OK " + (self.settings.banner or "mailgate POP3 ready.").encode() + b"\r\n"

    def goodbye_line(self, text: str) -> bytes:
        return b"-ERR [SYS/TEMP] " + text.encode() + b"\r\n"

    internal_error_line = b"-ERR [SYS/TEMP] Internal error, closing connection.\r\n"

    def next_command(self) -> None:
        try:
            line = self.read_line()
        except LineTooLong:
            self.err("Line too long.")   # RFC 2449 §4: refused, and the session goes on
            return
        self.dispatch(line)

    def read_line(self) -> bytes:
        """One client line; LineTooLong when it was over MAX_AUTH_LINE (already dropped)."""
        try:
            line = self.reader.read_line()
        except socket.timeout:
            self.try_send(INACTIVITY)
            raise ClientGone("idle timeout before login") from None
        except OSError as exc:
            raise ClientGone(f"read error: {exc.strerror or exc}") from None
        if line is None:
            raise ClientGone("client closed")
        self.bytes_in += len(line) + 2
        return line

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
        lines = ["+OK Capability list follows", "USER", "SASL PLAIN", "RESP-CODES",
                 "PIPELINING", "AUTH-RESP-CODE", "IMPLEMENTATION mailgate"]
        if self.listen.tls == "starttls":
            lines.append("STLS")
        self.send("\r\n".join(lines + ["."]).encode() + b"\r\n")

    def cmd_QUIT(self, argument: str) -> None:
        self.send(b"+OK Logging out.\r\n")
        self.end("quit")
        self.closing = True

    def cmd_NOOP(self, argument: str) -> None:
        self.err("Not logged in.")

    def cmd_STLS(self, argument: str) -> None:
        if self.listen.tls != "starttls":
            self.err("STLS is not available on this port.")
            return
        self.start_tls()

    def start_tls(self) -> None:
        """RFC 2595 §4: the TLS issue wraps the client socket here (and drops ``reader``'s
        buffered plaintext, which must not survive the handshake)."""
        self.send(b"-ERR [SYS/TEMP] TLS is not available yet.\r\n")

    def cmd_USER(self, argument: str) -> None:
        if not argument:
            self.err("USER needs a name.")
            return
        self.user = argument
        self.send(b"+OK\r\n")

    def cmd_PASS(self, argument: str) -> None:
        if not self.user:
            self.err("No user name given.")
            return
        user, self.user = self.user, ""
        self.login(user, argument, "USER")

    def cmd_AUTH(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            self.send(b"+OK\r\nPLAIN\r\n.\r\n")
            return
        if mechanism.upper() != "PLAIN":
            self.err("Unsupported authentication mechanism.")
            return
        if not initial:
            self.send(b"+ \r\n")
            try:
                initial = self.read_line().decode("ascii", "replace")
            except LineTooLong:
                self.err("Line too long.")
                return
            if initial == "*":
                self.err("Authentication cancelled.")
                return
        credentials = sasl.decode_plain(initial.encode("ascii", "replace"))
        if credentials is None:
            self.err("Invalid SASL PLAIN response.")
            return
        authzid, authcid, password = credentials
        self.login(sasl.login_identity(authzid, authcid), password, "PLAIN")

    # -- login ------------------------------------------------------------------------------------

    def backend_login(self, target, password: str, mechanism: str):
        backend = Pop3Backend(self.backend, target.backend.name, target.backend.connect_timeout)
        backend.greet()
        backend.forward_client(self.client_address, self.client_port, self.id)
        self.backend.settimeout(target.backend.login_timeout)
        answer = backend.login(target.login_name, password)
        return answer, backend.reader.take()

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
        pending_up = self.reader.take()
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
