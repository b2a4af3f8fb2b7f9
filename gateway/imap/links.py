"""The pieces the routing relay moves commands with: back-end links, command heads, and
re-encoding of command arguments (quoted strings or literals, never raw client text).
"""
from __future__ import annotations

import re

from gateway.imap import parser
from gateway.imap.backend import BackendConnection, quote_bytes
from gateway.imap.parser import Atom
from gateway.session import LoginError

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

    def __init__(self, backend: BackendConnection, name: str, relay):
        self.backend = backend
        self.name = name
        self.relay = relay
        self.literal_plus = "LITERAL+" in backend.capabilities

    def next_event(self):
        if not self.backend.reader.has_buffered():
            self.relay.flush()
        try:
            return self.backend.next_event()
        except LoginError as exc:
            raise LinkDown(self, exc.detail) from None

    def send(self, data: bytes) -> None:
        try:
            self.backend.sock.sendall(data)
        except OSError as exc:
            raise LinkDown(self, f"write error: {exc.strerror or exc}") from None

    def close(self) -> None:
        try:
            self.backend.sock.close()
        except OSError:
            pass


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
