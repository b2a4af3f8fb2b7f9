"""The client half of a submission session (RFC 6409): pre-auth at the gateway, then relay.

Before AUTH the gateway answers EHLO/HELO with its own extension list, STARTTLS, AUTH PLAIN
and AUTH LOGIN (RFC 4954, with or without an initial response, ``*`` cancels), NOOP, RSET,
HELP and QUIT; a mail transaction before AUTH gets ``530 5.7.0``.  After the back-end
accepted the replayed AUTH the session is a byte relay whose client side is followed by
:class:`Transactions` (message size, QUIT), never buffered.
"""
from __future__ import annotations

import socket
import time

from gateway import sasl
from gateway import session as session_mod
from gateway.session import ClientGone, Failure, Target, TooManyFailures
from gateway.smtp import login, verify
from gateway.smtp.framer import MAX_AUTH_LINE, MAX_COMMAND_LINE, LineFramer, TooLong, \
    Transactions
from gateway.stream import DeadlineExceeded, PeerClosed, ReadError, ReadTimeout, StreamReader

MAX_BAD_COMMANDS = 10
TEMPFAIL = b"454 4.7.0 Temporary authentication failure, try again later\r\n"
# Failure (by value: the shared limits add members) → answer; anything else is TEMPFAIL.
ANSWERS = {
    Failure.AUTH_FAILED.value: b"535 5.7.8 Authentication credentials invalid\r\n",
    "limit": b"454 4.7.0 Too many connections for this user or address\r\n",
    "throttled": b"454 4.7.0 Too many failed logins, try again later\r\n",
}
AUTH_REQUIRED = b"530 5.7.0 Authentication required\r\n"
TLS_REQUIRED = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
TRANSACTION = ("MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "ETRN", "BURL")


class SmtpSession(session_mod.Session):
    protocol = "submission"

    def __init__(self, service, client, address, listen):
        super().__init__(service, client, address, listen)
        self.settings = service.config.submission
        self.hostname = self.settings.hostname or socket.gethostname()
        goodbye = b"421 4.4.2 " + self.hostname.encode()
        self.read_failures = (
            (DeadlineExceeded, goodbye + b" Login took too long, closing connection\r\n",
             "login deadline"),
            (ReadTimeout, goodbye + b" Timeout, closing connection\r\n",
             "idle timeout before login"),
            (PeerClosed, b"", "client closed"),
        )
        self.reader = self.new_reader(client)
        self.greeted = False
        self.bad_commands = 0
        self.transactions: Transactions | None = None

    def new_reader(self, client) -> StreamReader:
        """The pre-AUTH reader (again after STARTTLS: nothing read before survives)."""
        return StreamReader(client, LineFramer(MAX_AUTH_LINE), recv_size=4096,
                            on_bytes=self.count_in)

    def greeting(self) -> bytes:
        text = self.settings.banner or "ESMTP mailgate ready"
        return f"220 {self.hostname} {text}\r\n".encode()

    def goodbye_line(self, text: str) -> bytes:
        return b"421 4.3.0 " + text.encode() + b"\r\n"

    internal_error_line = b"421 4.3.0 Internal error, closing connection\r\n"

    # -- reading ------------------------------------------------------------------------------

    def count_in(self, size: int) -> None:
        self.bytes_in += size

    def read_line(self) -> bytes | TooLong:
        """One client line without its line end (bounded by MAX_AUTH_LINE), or TooLong;
        time bounds and EOF end the session (ClientGone)."""
        try:
            event = self.reader.next_event()
        except ReadError as exc:
            raise self.read_failed(exc) from None
        return event if isinstance(event, TooLong) else event.text

    def next_command(self) -> None:
        line = self.read_line()
        if isinstance(line, TooLong) or len(line) + 2 > MAX_COMMAND_LINE:
            self.reject(LINE_TOO_LONG)      # RFC 5321 §4.5.3.1.4; the session goes on
            return
        verb, _, argument = line.partition(b" ")
        name = verb.decode("ascii", "replace").upper()
        handler = getattr(self, f"cmd_{name}", None) if name.isalpha() else None
        if handler is None:
            self.reject(AUTH_REQUIRED if name in TRANSACTION else
                        b"500 5.5.2 Command not recognized\r\n")
            return
        try:
            handler(argument.decode("utf-8", "replace").strip())
        except TooManyFailures:
            self.try_send(b"421 4.7.0 Too many authentication failures, closing connection\r\n")
            raise

    def reject(self, reply: bytes) -> None:
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:      # the reply and the 421 in one write
            self.try_send(reply + b"421 4.7.0 Too many errors, closing connection\r\n")
            raise ClientGone("too many invalid commands")
        self.send(reply)

    # -- commands before AUTH --------------------------------------------------------------------

    def extensions(self) -> list[str]:
        """Our EHLO keywords: nothing of the back-end, which is not chosen yet."""
        names = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES",
                 f"SIZE {self.settings.max_message_size}"]
        if self.can_start_tls:
            names.append("STARTTLS")
        if self.login_allowed:     # RFC 4954 §4: no mechanisms where AUTH would be refused
            names.append("AUTH PLAIN LOGIN")
        return names + ["SMTPUTF8"]

    def cmd_EHLO(self, argument: str) -> None:
        if not argument:
            self.reject(b"501 5.5.4 EHLO needs a domain or address literal\r\n")
            return
        self.greeted = True
        lines = [self.hostname] + self.extensions()
        body = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self.send(body.encode())

    def cmd_HELO(self, argument: str) -> None:
        if not argument:
            self.reject(b"501 5.5.4 HELO needs a domain\r\n")
            return
        self.greeted = True
        self.send(f"250 {self.hostname}\r\n".encode())

    def cmd_NOOP(self, argument: str) -> None:
        self.send(b"250 2.0.0 OK\r\n")

    def cmd_RSET(self, argument: str) -> None:
        self.send(b"250 2.0.0 OK\r\n")

    def cmd_HELP(self, argument: str) -> None:
        self.send(b"214 2.0.0 See RFC 6409\r\n")

    def cmd_QUIT(self, argument: str) -> None:
        self.send(b"221 2.0.0 Bye\r\n")
        self.end("quit")
        self.closing = True

    def cmd_STARTTLS(self, argument: str) -> None:
        if self.tls:
            self.reject(b"503 5.5.1 TLS already active\r\n")
            return
        if not self.can_start_tls:
            self.reject(b"502 5.5.1 STARTTLS not available\r\n")
            return
        if argument:
            self.reject(b"501 5.5.4 STARTTLS takes no parameters\r\n")
            return
        self.send(b"220 2.0.0 Ready to start TLS\r\n")
        # RFC 3207 §4.2: plaintext pipelined behind STARTTLS is dropped unread (a new
        # reader), and the client must say EHLO again.
        self.start_tls()
        self.greeted = False

    def cmd_AUTH(self, argument: str) -> None:
        if not self.login_allowed:
            self.reject(TLS_REQUIRED)
            return
        if not self.greeted:
            self.reject(b"503 5.5.1 Send EHLO first\r\n")
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in sasl.MECHANISMS:
            self.reject(b"504 5.5.4 Unrecognized authentication type\r\n")
            return
        initial = initial.strip()
        try:
            found = sasl.exchange(mechanism, initial.encode("ascii", "replace") if initial
                                  else None, self.challenge)
        except sasl.Malformed:
            self.reject(b"501 5.5.2 Invalid SASL response\r\n")
            return
        if found is not None:
            self.login(*found, mechanism)

    def challenge(self, prompt: bytes) -> bytes | None:
        """Send a 334 challenge; the client's base64 answer, or None after an answer was
        sent (``*`` cancel, a line too long)."""
        self.send(b"334 " + prompt + b"\r\n")
        line = self.read_line()
        if isinstance(line, TooLong):
            self.reject(LINE_TOO_LONG)
            return None
        if line.strip() == b"*":
            self.reject(b"501 5.7.0 Authentication cancelled\r\n")
            return None
        return line.strip()

    # -- login ------------------------------------------------------------------------------------

    def open_backend(self, target, password: str, mechanism: str):
        """Per mailbox, or every login at the one ``[submission] relay``.  A back-end that
        takes XCLIENT LOGIN= gets no password: the gateway checks it at the mailbox's IMAP
        back-end first (gateway/smtp/verify.py)."""
        relay = self.settings.relay_backend
        send_to = Target(relay, target.login_name) if relay is not None else target
        if send_to.config.submission_xclient_login:
            verify.check_password(target, password, mechanism, self.id)
            password = None
        backend = login.open_backend(send_to, password,
                                     (self.client_address, self.client_port, self.id),
                                     self.hostname)
        self.backend_sock = backend.sock
        self.backend_name = backend.name
        return backend.pending()

    def answer_success(self, result) -> None:
        self.backend_pending = result
        self.send(b"235 2.7.0 Authentication successful\r\n")

    def answer_failure(self, failure: Failure) -> None:
        self.send(ANSWERS.get(failure.value, TEMPFAIL))

    # -- after login ------------------------------------------------------------------------------

    backend_pending = b""

    def proxy(self) -> None:
        self.transactions = Transactions(self.settings.max_message_size)
        pending_up = self.reader.leftover()
        self.reader = None                     # pre-auth state is not kept for the session
        self.last_activity = time.monotonic()  # the idle clock starts at login
        self.hand_over(pending_up, self.backend_pending, self.watch)
        verdict = self.transactions.verdict   # from bytes pipelined behind AUTH
        if verdict is not None and self.relay is not None and self.verdict is None:
            self.verdict = verdict
            self.relay.finish("gateway", verdict.reason)

    def watch(self, buffer, size: int) -> None:
        """Every client chunk before it goes on: stop a message past the size limit."""
        verdict = self.transactions.feed(buffer, size)
        if verdict is not None and self.relay is not None:
            self.verdict = verdict
            self.relay.finish("gateway", verdict.reason)

    verdict = None

    def relay_ended(self, ending) -> None:
        """Before the relay closes: unless the client quit, tell it why the session ends."""
        if self.verdict is not None and ending.side == "gateway":
            self.relay.send_to_client(self.verdict.reply)
        elif self.transactions.quit_seen and ending.side != "gateway":
            self.end("quit")
        elif not self.closing:
            if ending.reason == "idle timeout":
                self.try_send(b"421 4.4.2 Idle timeout, closing connection\r\n")
            elif ending.side == "backend" and not _is_goodbye(self.relay.tail):
                self.try_send(b"421 4.3.0 Connection to the mail server lost\r\n")
        super().relay_ended(ending)


def _is_goodbye(chunk: bytes) -> bool:
    """Whether the back-end's last bytes were a 421 line (its own goodbye, as on a kick or
    shutdown): the client has its answer, a second would confuse it."""
    if not chunk.endswith(b"\n"):
        return False
    return chunk[:-1].rsplit(b"\n", 1)[-1].startswith(b"421")
