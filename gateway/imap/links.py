"""The pieces the routing relay moves commands with: back-end links and the pool that opens
them, command heads, and re-encoding of command arguments (quoted strings or literals,
never raw client text).

A link knows nothing of the relay: before it blocks on a read it calls the ``before_wait``
it was given (the relay flushes what it owes the client, so answers are never held back).
"""
from __future__ import annotations

import logging
import re
import time
from typing import Callable

from gateway.imap import parser
from gateway.imap import login, referrals
from gateway.imap.backend import BackendConnection, quote_bytes
from gateway.imap.parser import Atom
from gateway.metrics import recorder
from gateway.session import LoginError, Target

log = logging.getLogger("mailgate.imap.links")
_MARKER = re.compile(rb"(~?)\{(\d+)(\+?)\}(\r?\n)\Z")


class LinkDown(Exception):
    """A back-end connection of the relay failed; ``link`` says which."""

    def __init__(self, link, detail: str):
        super().__init__(detail)
        self.link = link


def with_marker(line: bytes, size: int, nonsync: bool) -> bytes:
    """The line with its trailing literal marker rewritten to ``{size}`` or ``{size+}``."""
    match = _MARKER.search(line)
    return line[:match.start()] + b"%s{%d%s}\r\n" % (match.group(1), size, b"+" if nonsync else b"")


def encode_tokens(tokens) -> list[bytes]:
    """Tokens (Atom, bytes, str, nested lists) → command parts as the parser gives them.

    Parts alternate text and literal payload: every text piece but the last ends with a
    ``{n}`` marker and its line end.  Strings are quoted when safe, literals otherwise.
    """
    parts = [b""]

    def emit(token, first: bool) -> None:
        if not first:
            parts[-1] += b" "
        if isinstance(token, list):
            parts[-1] += b"("
            for index, inner in enumerate(token):
                emit(inner, index == 0)
            parts[-1] += b")"
        elif isinstance(token, Atom):
            parts[-1] += token.encode("utf-8")
        else:
            raw = token.encode("utf-8") if isinstance(token, str) else token
            quoted = quote_bytes(raw)
            if quoted is not None:
                parts[-1] += quoted
            else:
                parts[-1] += b"{%d}\r\n" % len(raw)
                parts.extend([raw, b""])

    for index, token in enumerate(tokens):
        emit(token, index == 0)
    return parts


class Link:
    """One back-end connection of the relay: the home server or a referred one."""

    def __init__(self, backend: BackendConnection, name: str, before_wait: Callable[[], None]):
        self.backend = backend
        self.name = name
        self.before_wait = before_wait
        self.literal_plus = "LITERAL+" in backend.capabilities
        self.capabilities = backend.capabilities
        self.last_sent = time.monotonic()

    def offers(self, capability: str) -> bool:
        """Whether the server says it has ``capability`` (upper case; "THREAD=" prefixes)."""
        if capability.endswith("="):
            return any(c.startswith(capability) for c in self.capabilities)
        return capability in self.capabilities

    def next_event(self):
        if not self.backend.reader.has_buffered():
            self.before_wait()
        try:
            return self.backend.next_event()
        except LoginError as exc:
            raise LinkDown(self, exc.detail) from None

    def send(self, data: bytes) -> None:
        self.last_sent = time.monotonic()
        try:
            self.backend.sock.sendall(data)
        except OSError as exc:
            raise LinkDown(self, f"write error: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.backend.close()


class Head:
    """One client command as far as it has been read: small parts and a pending big literal."""

    def __init__(self, parts: list[bytes], big: parser.Literal | None):
        self.parts = parts
        self.big = big
        text = parts[:-1] + [_MARKER.sub(b"\r\n", parts[-1])] if big else parts
        try:
            self.command = parser.parse_command(text)
        except parser.ParseError:
            self.command = None
        first = parts[0].split(b" ", 2)
        self.tag = first[0].decode("ascii", "replace").strip()
        verb = first[1] if len(first) > 1 else b""
        self.name = verb.strip().decode("ascii", "replace").upper()
        if self.command is not None:
            self.tag, self.name = self.command.tag, self.command.name
        self.sub = ""   # UID's subcommand
        if self.name == "UID" and self.command and self.command.args:
            self.sub = str(self.command.args[0]).upper()


class LinkPool:
    """The home link and the referred links of one session, at most one per server and
    login name.  ``opener(target)`` returns a logged-in back-end (or raises LoginError);
    ``after_open(link)``, when set, prepares a new link before its first use."""

    def __init__(self, home: Link, opener: Callable[[Target], BackendConnection], policy,
                 login_name: str, session_id: str):
        self.home = home
        self.opener = opener
        self.policy = policy
        self.login_name = login_name
        self.session_id = session_id
        self.remotes: dict[tuple[str, int, str], Link] = {}
        self.after_open: Callable[[Link], None] | None = None

    def links(self) -> list[Link]:
        return [self.home, *self.remotes.values()]

    def unused(self, seconds: float, busy: Link | None) -> list[Link]:
        """The links nothing was sent on for ``seconds`` (``busy`` left out)."""
        since = time.monotonic() - seconds
        return [link for link in self.links() if link is not busy and link.last_sent <= since]

    def for_referral(self, referral: list) -> tuple[Link, Target] | None:
        """A link to the referral's first reachable allowed target (RFC 2193 §4: replicas
        in order), or None when none can be used."""
        for target in self.policy.targets(referral, self.login_name, self.session_id):
            try:
                link = self.open(target)
                recorder.referral("mailbox")
                return link, target
            except LinkDown as down:
                log.warning("session=%s referred server %s unavailable: %s", self.session_id,
                            target.config.name, down)
        return None

    def open(self, target: Target) -> Link:
        """The link to ``target``'s server, opened and logged in on first use."""
        key = (target.config.address.lower(), target.config.imap_port, target.login_name)
        if key in self.remotes:
            return self.remotes[key]
        try:
            backend = self.opener(target)
        except LoginError as exc:
            raise LinkDown(None, exc.detail) from None
        link = Link(backend, target.config.name, self.home.before_wait)
        self.remotes[key] = link
        log.info("session=%s opened referred connection to %s", self.session_id, link.name)
        if self.after_open is not None:
            self.after_open(link)
        return link

    def drop(self, link: Link) -> None:
        """Forget and close a remote link that failed."""
        log.warning("session=%s remote %s lost: closing it", self.session_id, link.name)
        self.remotes = {k: v for k, v in self.remotes.items() if v is not link}
        link.close()

    def close(self) -> None:
        """Close the referred links; no more can be opened (the credentials go)."""
        for link in self.remotes.values():
            link.close()
        self.remotes = {}
        self.opener = None


def referred_opener(session, password: str,
                    mechanism: str) -> Callable[[Target], BackendConnection]:
    """The LinkPool's opener: a logged-in connection to a referred server with this
    session's credentials (RFC 2193: the same ones as at home), by the one back-end login."""
    credentials = login.Credentials(password, mechanism)

    def open_referred(target: Target) -> BackendConnection:
        try:
            backend, _ = login.open_backend(target, credentials, session.id_fields())
        except referrals.Referred as referred:
            if referred.kept is None:
                raise
            backend = referred.kept[0]   # OK [REFERRAL]: logged in here; not followed further
        backend.unbounded(session.settings.idle_timeout)
        return backend

    return open_referred
