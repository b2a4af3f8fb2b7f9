"""A scripted IMAP back-end that issues RFC 2193 mailbox referrals, in front of a real Dovecot.

No server we can install answers ``NO [REFERRAL ...]`` for a mailbox, so this one does, and
only that: every other command goes to a real Dovecot (``home``) and Dovecot's answer comes
back byte for byte.  It runs in threads inside the test process, on a free loopback port.

Per client connection it is an IMAP server to its client and an IMAP client of ``home``:

* greeting ``* OK [CAPABILITY ... MAILBOX-REFERRALS ...]``; CAPABILITY and ID are answered
  here; LOGIN and AUTHENTICATE PLAIN are replayed to Dovecot (arguments re-sent as LITERAL+
  literals) and Dovecot's result returned, with this server's capabilities on success;
* RLIST / RLSUB (RFC 2193 §5) become LIST / LSUB at Dovecot, and the configured public
  folders ("public/NAME", which live on ``remote_host:remote_port``) are added before the
  tagged OK; plain LIST / LSUB show Dovecot's folders only, as RFC 2193 §6 asks;
* ``elsewhere`` maps more folder names to (host, port, name there): a second remote server
  that knows the folder by another name (a referral that renames);
* SELECT, EXAMINE, STATUS, APPEND, CREATE, DELETE, SUBSCRIBE, UNSUBSCRIBE of a public
  folder, RENAME from or to one, and [UID] COPY / MOVE into one are answered
  ``NO [REFERRAL imap://user;AUTH=*@remote:port/public/NAME] Remote mailbox``; an APPEND
  with a synchronizing literal gets that NO instead of the "+" (RFC 3501 §7.5);
* everything else is relayed verbatim, literals streamed, IDLE's DONE included.

Local answers wait until Dovecot has completed the commands relayed before them, so a
pipelining client sees tagged answers in order.  ``stop()`` closes every socket; all
threads are daemons and every read has a timeout.
"""

from __future__ import annotations

import base64
import binascii
import collections
import re
import socket
import threading

from gateway.imap.parser import (
    Framer, Line, LiteralChunk, ParseError, parse_command, parse_response,
)
from gateway.imap.urls import ImapUrl, format_url, mutf7_decode, mutf7_encode

import servers

GREETING_CAPABILITIES = "IMAP4rev1 LITERAL+ MAILBOX-REFERRALS ID IDLE UIDPLUS UNSELECT"
# LIST-EXTENDED and LIST-STATUS as a Dovecot home would offer them: relayed as they are,
# extended LISTs would list this server's own folders only (RFC 2193 refers only RLIST).
LOGGED_IN_CAPABILITIES = GREETING_CAPABILITIES + " NAMESPACE MOVE LIST-EXTENDED LIST-STATUS"
MAX_BUFFERED_COMMAND = 1 << 20   # an inspected command (not an APPEND message) is held whole
MAX_LINE = 65536

# tag SP name [SP sub-command]: enough to route a command before its literals arrive.
_HEAD = re.compile(rb'([^\x00-\x20\x7f-\xff(){%*"\\+]+) ([A-Za-z]+)(?: ([A-Za-z]+))?')
_SYNC_MARKER = re.compile(rb"\{(\d+)\}(\r?\n)$")
_ANY_MARKER = re.compile(rb"~?\{\d+\+?\}\r?\n$")
_QUOTABLE = re.compile(rb'[\x20-\x7e]*')


class _Closed(Exception):
    """The client or Dovecot went away, or the session must end."""


class ReferralBackend:
    """The scripted referral server (see the module docstring).

    ``home`` is the running Dovecot that holds each user's own mailboxes;
    ``remote_host:remote_port`` is where the public folders are (named in referrals unless
    ``referral_host`` / ``referral_port`` say otherwise, e.g. a host the gateway must refuse).
    ``public_folders`` are names below ``public_prefix`` ("news" → "public/news").
    """

    def __init__(self, home: servers.Dovecot, *, remote_host: str, remote_port: int,
                 public_prefix: str = "public/", public_folders=(),
                 referral_host: str | None = None, referral_port: int | None = None,
                 idle_timeout: float = 600.0, home_timeout: float = 10.0,
                 dead_replicas: tuple = (), greeting_referral: str = "",
                 login_referral: str = "", elsewhere: dict | None = None):
        self.home = home
        self.elsewhere = dict(elsewhere or {})
        # RFC 2221 forms Dovecot cannot produce: "* BYE [REFERRAL url]" as the greeting, and
        # "tag OK [REFERRAL url]" for a successful login (this server stays usable).
        self.greeting_referral = greeting_referral
        self.login_referral = login_referral
        self.dead_replicas = list(dead_replicas)   # (host, port) named before the real one
        self.remote_host = remote_host
        self.remote_port = remote_port
        self.public_prefix = public_prefix
        self.public_folders = [public_prefix + name for name in public_folders]
        self.public_folders += list(self.elsewhere)
        self.referral_host = referral_host or remote_host
        self.referral_port = referral_port or remote_port
        self.idle_timeout = idle_timeout
        self.home_timeout = home_timeout
        self.host = servers.LOOPBACK
        self.port = 0
        self.commands: list[bytes] = []   # every line clients sent, literal payloads left out
        self._lock = threading.Lock()
        self._sessions: set[_Session] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()

    def __enter__(self) -> ReferralBackend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> ReferralBackend:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(64)
        listener.settimeout(0.2)   # accept() polls the stop flag
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"referral-backend-{self.port}")
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every client and Dovecot connection, join the threads."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.close()
        for session in sessions:
            session.join(5)

    def referral_url(self, user: str | None, mailbox_wire: str, replicas: bool = True) -> str:
        """The URL this server refers ``mailbox_wire`` (a modified UTF-7 name) to."""
        try:
            mailbox = mutf7_decode(mailbox_wire)
        except ValueError:
            mailbox = mailbox_wire
        if mailbox in self.elsewhere:
            host, port, there = self.elsewhere[mailbox]
            return format_url(ImapUrl(host, port, user, "*", there))
        url = format_url(ImapUrl(self.referral_host, self.referral_port, user, "*", mailbox))
        # Replicas named first (best first, RFC 2193 §4) that the test made unreachable.
        dead = [format_url(ImapUrl(host, port, user, "*", mailbox))
                for host, port in (self.dead_replicas if replicas else ())]
        return " ".join(dead + [url])

    def is_public(self, mailbox_wire: str) -> bool:
        return mailbox_wire.startswith(self.public_prefix) or mailbox_wire in self.elsewhere

    def record(self, line: bytes) -> None:
        with self._lock:
            self.commands.append(line)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            session = _Session(self, client)
            with self._lock:
                if self._stopping.is_set():
                    client.close()
                    return
                self._sessions.add(session)
            session.start()

    def _forget(self, session: _Session) -> None:
        with self._lock:
            self._sessions.discard(session)


class _Stream:
    """Framed events (Line / LiteralChunk) read from one socket; None at end of stream."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.framer = Framer(max_line=MAX_LINE)
        self.events: collections.deque = collections.deque()

    def next(self) -> Line | LiteralChunk | None:
        while not self.events:
            data = self.sock.recv(65536)   # bounded by the socket's timeout
            if not data:
                return None
            self.events.extend(self.framer.feed(data))
        return self.events.popleft()

    def next_line(self) -> Line:
        event = self.next()
        if event is None:
            raise _Closed("end of stream")
        if not isinstance(event, Line):
            raise _Closed("literal data where a line was expected")
        return event

    def read_literal(self, limit: int) -> bytes:
        payload = bytearray()
        while True:
            event = self.next()
            if event is None:
                raise _Closed("end of stream inside a literal")
            payload += event.data
            if len(payload) > limit:
                raise _Closed("literal too large")
            if event.last:
                return bytes(payload)

    def refuse_literal(self) -> None:
        """The command was answered instead of "+": its payload never comes (RFC 3501 §7.5),
        so whatever arrived after the line is read as new lines."""
        leftover = b"".join(event.data for event in self.events)
        self.events.clear()
        self.framer = Framer(max_line=MAX_LINE)
        self.events.extend(self.framer.feed(leftover))

    def read_response(self) -> list[bytes]:
        """One whole response as parse_response parts (bounded)."""
        line = self.next_line()
        parts = [line.data]
        while line.literal is not None:
            parts.append(self.read_literal(MAX_BUFFERED_COMMAND))
            line = self.next_line()
            parts.append(line.data)
        return parts


def _wire(arg) -> bytes:
    """A parsed argument (Atom, or bytes from a quoted string or literal) as raw bytes."""
    if isinstance(arg, list):
        raise ValueError("a list where a string was expected")
    return arg.encode() if isinstance(arg, str) else arg


def _astring(value: bytes) -> bytes:
    """``value`` as a quoted string, or a LITERAL+ literal when quoting cannot hold it."""
    if _QUOTABLE.fullmatch(value) and len(value) < 1024:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d+}\r\n" % len(value) + value


def _nonsync(line: bytes) -> bytes:
    """A line's {n} marker as {n+}: this side already answered "+" to the client."""
    return _SYNC_MARKER.sub(rb"{\1+}\2", line)


def _list_regex(reference: str, pattern: str) -> re.Pattern:
    """RFC 3501 §6.3.8: "*" matches anything, "%" anything but the hierarchy delimiter."""
    text = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c)
                   for c in reference + pattern)
    return re.compile(text, re.DOTALL)


class _Session(threading.Thread):
    """One client connection: the client side in this thread, Dovecot's side in a copier."""

    def __init__(self, backend: ReferralBackend, client: socket.socket):
        super().__init__(daemon=True, name=f"referral-session-{client.fileno()}")
        self.backend = backend
        self.client_sock = client
        self.client_sock.settimeout(backend.idle_timeout)
        self.client = _Stream(client)
        self.home_sock: socket.socket | None = None
        self.home: _Stream | None = None
        self.user: str | None = None
        self.write_lock = threading.RLock()
        self.done = threading.Condition()
        self.outstanding: list[bytes] = []    # tags relayed to Dovecot, not yet completed
        self.list_hooks: dict[bytes, tuple] = {}
        self.copier: threading.Thread | None = None
        self.closed = False
        self.expect_done = False              # the line after a relayed IDLE is its DONE

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self.backend.greeting_referral:
                self.reply(b"* BYE [REFERRAL %s] Try there\r\n"
                           % self.backend.greeting_referral.encode())
                return
            home = self.backend.home
            self.home_sock = socket.create_connection((home.host, home.imap_port),
                                                      timeout=self.backend.home_timeout)
            self.home = _Stream(self.home_sock)
            self.home.read_response()   # Dovecot's greeting
            self.reply(b"* OK [CAPABILITY %s] scripted referral server ready\r\n"
                       % GREETING_CAPABILITIES.encode())
            self.serve()
        except ParseError as exc:
            self._bye(f"protocol error: {exc}")
        except (OSError, _Closed):
            pass
        finally:
            self.close()
            if self.copier is not None:
                self.copier.join(5)
            self.backend._forget(self)

    def close(self) -> None:
        self.closed = True
        with self.done:
            self.done.notify_all()
        for sock in (self.client_sock, self.home_sock):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _bye(self, text: str) -> None:
        try:
            self.reply(f"* BYE {text}\r\n".encode())
        except OSError:
            pass

    # -- writing ---------------------------------------------------------------------------

    def reply(self, data: bytes) -> None:
        with self.write_lock:
            self.client_sock.sendall(data)

    def answer(self, tag: str, text: str) -> None:
        """A local tagged answer, after Dovecot's answers to earlier relayed commands."""
        self.wait_relayed()
        self.reply(f"{tag} {text}\r\n".encode())

    def wait_relayed(self) -> None:
        with self.done:   # bounded: a command Dovecot never completes must not hang us
            self.done.wait_for(lambda: not self.outstanding or self.closed,
                               3 * self.backend.home_timeout)

    def to_home(self, tag: str | None, data: bytes) -> None:
        if tag is not None:
            with self.done:
                self.outstanding.append(tag.encode())
        self.home_sock.sendall(data)

    # -- the client side -------------------------------------------------------------------

    def serve(self) -> None:
        while not self.closed:
            event = self.client.next()
            if event is None:
                return
            if not isinstance(event, Line):
                raise _Closed("literal data where a command was expected")
            self.backend.record(event.data)
            if self.expect_done:
                self.expect_done = False
                self.relay(event, None, "DONE")
                continue
            head = _HEAD.match(event.data)
            if head is None:
                self._unparsed(event)
                continue
            tag, name, sub = (head.group(1).decode(), head.group(2).decode().upper(),
                              (head.group(3) or b"").decode().upper())
            key = f"UID {sub}" if name == "UID" and sub else name
            if self.user is None:
                self.dispatch(_PREAUTH, event, tag, key, self.cmd_preauth_other)
            elif key == "APPEND":
                self.cmd_APPEND(event, tag)
            elif key in _INSPECTED:
                self.dispatch(_INSPECTED, event, tag, key, None)
            else:
                self.relay(event, tag, key)

    def _unparsed(self, event: Line) -> None:
        if self.user is None:
            self.collect(event)
            self.answer("*", "BAD Missing tag or command")
        else:
            self.relay(event, None, "")   # Dovecot says what is wrong with it

    def dispatch(self, table: dict, first: Line, tag: str, key: str, fallback) -> None:
        parts = self.collect(first)
        try:
            command = parse_command(parts)
        except ParseError as exc:
            self.answer(tag, f"BAD {exc}")
            return
        handler = table.get(key)
        try:
            if handler is None:
                fallback(command, parts)
            else:
                handler(self, command, parts)
        except ValueError as exc:   # an argument of the wrong shape (a list for a string)
            self.answer(tag, f"BAD {exc}")

    def collect(self, first: Line) -> list[bytes]:
        """The whole command as parse_command parts, answering "+" to sync literals."""
        parts, line, size = [first.data], first, len(first.data)
        while line.literal is not None:
            if not line.literal.nonsync:
                self.reply(b"+ Ready for literal data\r\n")
            parts.append(self.client.read_literal(MAX_BUFFERED_COMMAND - size))
            line = self.client.next_line()
            self.backend.record(line.data)
            parts.append(line.data)
            size += len(parts[-2]) + len(line.data)
        return parts

    def relay(self, first: Line, tag: str | None, name: str) -> None:
        """Forward a command verbatim, its literals streamed (Dovecot sends any "+")."""
        self.to_home(tag, first.data)
        line = first
        while line.literal is not None:
            while True:
                event = self.client.next()
                if event is None:
                    raise _Closed("client closed inside a literal")
                self.home_sock.sendall(event.data)
                if isinstance(event, LiteralChunk) and event.last:
                    break
            line = self.client.next_line()
            self.backend.record(line.data)
            self.home_sock.sendall(line.data)
        if name == "IDLE":
            self.expect_done = True

    def forward(self, command, parts: list[bytes]) -> None:
        """Send a collected command to Dovecot (this side already sent any "+")."""
        self.to_home(command.tag, b"".join(_nonsync(p) if i % 2 == 0 else p
                                           for i, p in enumerate(parts)))

    def refer(self, tag: str, *mailboxes: str) -> None:
        urls = " ".join(self.backend.referral_url(self.user, m, replicas=len(mailboxes) == 1)
                        for m in mailboxes)
        self.answer(tag, f"NO [REFERRAL {urls}] Remote mailbox")

    # -- not logged in ---------------------------------------------------------------------

    def cmd_preauth_other(self, command, parts) -> None:
        self.answer(command.tag, "BAD Log in first")

    def cmd_CAPABILITY(self, command, parts) -> None:
        caps = LOGGED_IN_CAPABILITIES if self.user else GREETING_CAPABILITIES + " AUTH=PLAIN"
        self.wait_relayed()
        self.reply(f"* CAPABILITY {caps}\r\n".encode())
        self.answer(command.tag, "OK Capability completed")

    def cmd_ID(self, command, parts) -> None:
        self.wait_relayed()
        self.reply(b"* ID NIL\r\n")
        self.answer(command.tag, "OK ID completed")

    def cmd_NOOP(self, command, parts) -> None:
        self.answer(command.tag, "OK NOOP completed")

    def cmd_LOGOUT(self, command, parts) -> None:
        self.reply(b"* BYE Logging out\r\n")
        self.answer(command.tag, "OK Logout completed")
        raise _Closed("logout")

    def cmd_STARTTLS(self, command, parts) -> None:
        self.answer(command.tag, "NO STARTTLS is not offered here")

    def cmd_LOGIN(self, command, parts) -> None:
        if len(command.args) != 2:
            self.answer(command.tag, "BAD LOGIN needs a user name and a password")
            return
        user, password = (_wire(arg) for arg in command.args)
        self.home_sock.sendall(b"%s LOGIN %s %s\r\n" % (command.tag.encode(), _astring(user),
                                                         _astring(password)))
        self.finish_login(command.tag, user.decode("utf-8", "replace"))

    def cmd_AUTHENTICATE(self, command, parts) -> None:
        if not command.args or str(command.args[0]).upper() != "PLAIN":
            self.answer(command.tag, "NO Only AUTHENTICATE PLAIN is offered here")
            return
        initial = _wire(command.args[1]) if len(command.args) > 1 else None
        line = b"%s AUTHENTICATE PLAIN" % command.tag.encode()
        self.home_sock.sendall(line + (b" " + initial if initial else b"") + b"\r\n")
        self.finish_login(command.tag, None, initial)

    def finish_login(self, tag: str, user: str | None, sasl: bytes | None = None) -> None:
        """Carry Dovecot's side of a login (SASL continuations too) to its tagged result."""
        while True:
            response = self.home.read_response()
            first = response[0]
            if first.startswith(b"+"):
                self.reply(first)
                line = self.client.next_line()
                self.backend.record(line.data)
                sasl = line.data.strip()
                self.home_sock.sendall(line.data)
                continue
            if first.startswith(tag.encode() + b" "):
                break
            self.reply(b"".join(response))   # untagged data: pass it on
        kind = first[len(tag) + 1:].split(b" ", 1)[0].upper()
        if kind != b"OK":
            self.reply(first)   # Dovecot's own NO/BAD, verbatim
            return
        self.user = user if user is not None else _plain_user(sasl)
        if self.backend.login_referral:
            self.reply(f"{tag} OK [REFERRAL {self.backend.login_referral}] Logged in, but "
                       "try there\r\n".encode())
        else:
            self.reply(f"{tag} OK [CAPABILITY {LOGGED_IN_CAPABILITIES}] Logged in\r\n".encode())
        self.copier = threading.Thread(target=self.copy_home, daemon=True,
                                       name=f"{self.name}-copier")
        self.copier.start()

    # -- logged in: commands that may name a public folder ----------------------------------

    def _mailbox(self, arg) -> str:
        return _wire(arg).decode("utf-8", "replace")

    def cmd_mailbox_first(self, command, parts) -> None:
        """SELECT, EXAMINE, STATUS, CREATE, DELETE, SUBSCRIBE, UNSUBSCRIBE."""
        if command.args and not isinstance(command.args[0], list):
            mailbox = self._mailbox(command.args[0])
            if self.backend.is_public(mailbox):
                self.refer(command.tag, mailbox)
                return
        self.forward(command, parts)

    def cmd_RENAME(self, command, parts) -> None:
        names = [self._mailbox(a) for a in command.args[:2] if not isinstance(a, list)]
        if len(names) == 2 and any(self.backend.is_public(n) for n in names):
            self.refer(command.tag, *names)
            return
        self.forward(command, parts)

    def cmd_copy(self, command, parts) -> None:
        """COPY / MOVE set mailbox; UID COPY / UID MOVE: args[0] is the sub-command."""
        args = command.args[1:] if command.name == "UID" else command.args
        if len(args) == 2 and not isinstance(args[1], list):
            mailbox = self._mailbox(args[1])
            if self.backend.is_public(mailbox):
                self.refer(command.tag, mailbox)
                return
        self.forward(command, parts)

    def cmd_rlist(self, command, parts) -> None:
        """RLIST / RLSUB: Dovecot's LIST / LSUB plus the public folders (RFC 2193 §5)."""
        if len(command.args) != 2 or any(isinstance(a, list) for a in command.args):
            self.answer(command.tag, f"BAD {command.name} needs a reference and a pattern")
            return
        verb = "LIST" if command.name == "RLIST" else "LSUB"
        reference, pattern = (_wire(a) for a in command.args)
        with self.done:
            self.list_hooks[command.tag.encode()] = (
                verb, reference.decode("utf-8", "replace"), pattern.decode("utf-8", "replace"),
                set())
        self.to_home(command.tag, b"%s %s %s %s\r\n" % (
            command.tag.encode(), verb.encode(), _astring(reference), _astring(pattern)))

    def cmd_APPEND(self, first: Line, tag: str) -> None:
        """Hold the command until its mailbox is known, then refer it or stream it through."""
        parts, line = [first.data], first
        mailbox = _append_mailbox(parts)
        while mailbox is None and line.literal is not None and len(parts) < 3:
            if not line.literal.nonsync:   # the mailbox itself is a literal
                self.reply(b"+ Ready for literal data\r\n")
            parts.append(self.client.read_literal(MAX_LINE))
            line = self.client.next_line()
            self.backend.record(line.data)
            parts.append(line.data)
            mailbox = _append_mailbox(parts)
        if mailbox is None or not self.backend.is_public(mailbox):
            self.to_home(tag, b"".join(_nonsync(p) if i % 2 == 0 else p
                                       for i, p in enumerate(parts[:-1])))
            self.relay(Line(parts[-1], line.literal), None, "APPEND")
            return
        self.discard_messages(line)
        self.refer(tag, mailbox)

    def discard_messages(self, line: Line) -> None:
        """Drop the rest of a referred APPEND: LITERAL+ payloads are read and thrown away,
        a synchronizing one is never asked for (the tagged NO replaces the "+")."""
        while line.literal is not None:
            if not line.literal.nonsync:
                self.client.refuse_literal()
                return
            self.client.read_literal(1 << 62)   # streamed, nothing kept
            line = self.client.next_line()
            self.backend.record(line.data)

    # -- Dovecot's side --------------------------------------------------------------------

    def copy_home(self) -> None:
        """Dovecot → client, one whole response at a time under the write lock; RLIST's
        public folders go in before its tagged OK."""
        locked = False
        try:
            while not self.closed:
                try:
                    event = self.home.next()
                except TimeoutError:
                    continue
                if event is None:
                    return
                if isinstance(event, Line) and not locked:
                    self.write_lock.acquire()
                    locked = True
                    self._before_response(event)
                self.client_sock.sendall(event.data)
                if isinstance(event, Line) and event.literal is None:
                    self.write_lock.release()
                    locked = False
                    self._after_response(event.data)
        except (OSError, ParseError, _Closed):
            pass
        finally:
            if locked:
                self.write_lock.release()
            self.close()

    def _before_response(self, line: Line) -> None:
        tag = line.data.split(b" ", 1)[0]
        if not self.list_hooks:
            return
        if tag == b"*" and line.literal is None:
            self._note_listed(line.data)
        elif tag in self.list_hooks:
            with self.done:
                verb, reference, pattern, seen = self.list_hooks.pop(tag)
            if line.data[len(tag) + 1:].upper().startswith(b"OK"):
                self.client_sock.sendall(self._public_listing(verb, reference, pattern, seen))

    def _note_listed(self, data: bytes) -> None:
        try:
            response = parse_response([data])
        except ParseError:
            return
        if response.kind in ("LIST", "LSUB") and len(response.args or ()) == 3:
            name = response.args[2]
            if not isinstance(name, list):
                for hook in self.list_hooks.values():
                    hook[3].add(_wire(name).decode("utf-8", "replace"))

    def _public_listing(self, verb: str, reference: str, pattern: str, seen: set) -> bytes:
        """Untagged LIST/LSUB lines for the public folders matching reference + pattern,
        with their not-yet-listed parents as \\Noselect (as Dovecot lists "public")."""
        regex = _list_regex(reference, pattern)
        lines, listed = [], set(seen)
        for folder in self.backend.public_folders:
            names = folder.split("/")
            parents = ["/".join(names[:i]) for i in range(1, len(names))]
            if verb == "LSUB" and not pattern.endswith("%"):
                parents = []   # RFC 3501 §6.3.9: only "%" reports unsubscribed parents
            for name, flags in [(p, r"(\Noselect \HasChildren)") for p in parents] + [
                    (folder, "()")]:
                wire = mutf7_encode(name)
                if wire in listed or not regex.fullmatch(wire):
                    continue
                listed.add(wire)
                quoted = wire.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'* {verb} {flags} "/" "{quoted}"\r\n')
        return "".join(lines).encode()

    def _after_response(self, data: bytes) -> None:
        tag = data.split(b" ", 1)[0]
        if tag in (b"*", b"+"):
            return
        with self.done:
            if tag in self.outstanding:
                self.outstanding.remove(tag)
                self.done.notify_all()


def _append_mailbox(parts: list[bytes]) -> str | None:
    """APPEND's mailbox once the parts so far hold it (the last line's marker is a message's
    or the mailbox's own literal: cut it off and see whether an argument is left)."""
    try:
        command = parse_command(parts[:-1] + [_ANY_MARKER.sub(b"\r\n", parts[-1])])
    except ParseError:
        return None
    if not command.args or isinstance(command.args[0], list):
        return None
    return _wire(command.args[0]).decode("utf-8", "replace")


def _plain_user(sasl: bytes | None) -> str | None:
    """The user of a SASL PLAIN message (authzid, else authcid), for referral URLs."""
    try:
        message = base64.b64decode(sasl or b"", validate=True)
    except (binascii.Error, ValueError):
        return None
    fields = message.split(b"\0")
    if len(fields) != 3:
        return None
    return (fields[0] or fields[1]).decode("utf-8", "replace")


_PREAUTH = {name: getattr(_Session, f"cmd_{name}") for name in (
    "CAPABILITY", "ID", "NOOP", "LOGOUT", "STARTTLS", "LOGIN", "AUTHENTICATE")}
_INSPECTED = {
    "CAPABILITY": _Session.cmd_CAPABILITY, "ID": _Session.cmd_ID,
    "RLIST": _Session.cmd_rlist, "RLSUB": _Session.cmd_rlist,
    "RENAME": _Session.cmd_RENAME,
    **{name: _Session.cmd_mailbox_first for name in (
        "SELECT", "EXAMINE", "STATUS", "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE")},
    **{name: _Session.cmd_copy for name in ("COPY", "MOVE", "UID COPY", "UID MOVE")},
}
