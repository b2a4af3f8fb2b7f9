"""The forwarding engine of the routing relay: the client's side (commands read up to a big
literal, answers buffered and flushed) and sending one command to a link with its answer
relayed back.  It does not decide where a command goes: routing.py does.

Literals larger than SMALL_LITERAL stream through in chunks; smaller ones are held so that
a command can be re-sent elsewhere when a back-end answers it with a referral.
"""
from __future__ import annotations

import re
import time
from typing import Callable

from gateway.imap import parser, referrals, urls
from gateway.imap.backend import filter_capability_line
from gateway.imap.links import Head, Link, LinkDown, encode_tokens, with_marker
from gateway.imap.parser import Atom, Line, LiteralChunk, Response
from gateway.imap.reader import ImapReader
from gateway.session import ClientGone
from gateway.stream import ReadError, ReadTimeout

SMALL_LITERAL = 65536
FLUSH_AT = 65536
_REFERRAL_CODE = re.compile(rb"\[REFERRAL [^]]*\] ?", re.I)

# What a relayed untagged line becomes: the line (maybe rewritten), or None to drop it.
Untagged = Callable[[bytes], "bytes | None"]


def drop_all(line: bytes) -> None:
    return None


class ClientSide:
    """The logged-in client: its commands as Heads, its answers buffered until a wait.

    While no client byte comes for ``tick_every`` seconds ``tick()`` is called (the relay
    keeps its back-end connections alive with it); ``idle_timeout`` of silence ends it.
    """

    def __init__(self, session, tick: Callable[[], None], tick_every: float):
        self.session = session
        self.sock = session.client
        self.reader = ImapReader(session.client, max_line=session.settings.max_line,
                                 recv_size=65536, on_bytes=self.received)
        self.out = bytearray()
        self.idling = False          # in IDLE: answers are flushed by their relay, not here
        self.ticking = False         # between commands: tick() may use the back-ends
        self.tick = tick
        self.idle_timeout = session.settings.idle_timeout
        self.tick_every = min(tick_every, self.idle_timeout)

    def received(self, size: int) -> None:
        self.session.bytes_in += size
        self.session.touch()

    def feed(self, pending: bytes) -> None:
        """Bytes the pre-login dialogue read past the login (a pipelining client), framed
        ahead of anything read from now on."""
        if pending:
            self.reader.events.extend(self.reader.framer.feed(pending))

    def to_client(self, data: bytes) -> None:
        self.out += data
        if len(self.out) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self.out:
            data, self.out = bytes(self.out), bytearray()
            self.send(data)

    def send(self, data: bytes) -> None:
        # A slow reader has the idle timeout to take each write (reads wake every tick).
        self.sock.settimeout(self.idle_timeout)
        self.session.send(data)

    def reply(self, tag: str, text: str) -> None:
        self.to_client(f"{tag} {text}\r\n".encode())
        self.flush()

    def continuation(self) -> None:
        self.send(b"+ Ready for literal data.\r\n")

    def next_event(self):
        """The client's next framer event; ticks while it is silent between commands."""
        quiet_since = time.monotonic()
        while True:
            if not self.idling and not self.reader.has_buffered():
                self.flush()
            self.reader.idle_timeout = self.tick_every
            try:
                return self.reader.next_event()
            except ReadTimeout:
                if time.monotonic() - quiet_since >= self.idle_timeout:
                    self.session.try_send(b"* BYE Autologout; idle for too long.\r\n")
                    raise ClientGone("client idle timeout") from None
                if self.ticking:
                    self.tick()
            except ReadError as exc:
                raise ClientGone(f"client {exc}") from None
            except parser.ParseError as exc:
                self.reader.events.extend(getattr(exc, "events", ()))
                if not self.reader.events:
                    self.session.try_send(b"* BYE Command line too long.\r\n")
                    raise ClientGone(f"protocol error: {exc}") from None

    def read_head(self) -> Head:
        """Read a command up to its end, or up to a literal too big to hold."""
        parts: list[bytes] = []
        while True:
            event = self.next_event()
            if not isinstance(event, Line):
                continue
            parts.append(event.data)
            if event.literal is None:
                return Head(parts, None)
            if event.literal.size > SMALL_LITERAL:
                return Head(parts, event.literal)
            if not event.literal.nonsync:
                self.continuation()
            parts.append(self.read_literal(event.literal.size))

    def read_literal(self, size: int) -> bytes:
        payload = bytearray()
        while len(payload) < size or size == 0:
            chunk = self.next_event()
            payload += chunk.data
            if chunk.last:
                break
        return bytes(payload)

    def stream_literal(self, link: Link | None) -> None:
        """Pass the client's pending literal to ``link`` chunk by chunk (None = discard)."""
        while True:
            chunk = self.next_event()
            if link is not None:
                link.send(chunk.data)
            if chunk.last:
                return

    def discard_pending(self, head: Head) -> None:
        """Read and drop a non-synchronising literal the client is already sending."""
        if head.big is not None and head.big.nonsync:
            head.big = None
            self.stream_literal(None)
            while True:
                event = self.next_event()
                if isinstance(event, Line) and event.literal is None:
                    return
                if isinstance(event, Line):
                    self.stream_literal(None)


class Forwarder:
    """Sends commands to links and relays their answers to the client.

    Referrals are never shown to a referral-unaware client: a tagged one is returned to the
    caller (``intercept``) or turned into ``NO [UNAVAILABLE]``; ``passthrough`` (a client
    that said RLIST, when allowed) shows them as they are.
    """

    def __init__(self, client: ClientSide, capabilities_kept: tuple[str, ...] = ()):
        self.client = client
        self.passthrough = False
        self.capabilities_kept = capabilities_kept   # for filter_capability_line
        self.tags = 0

    def next_tag(self) -> str:
        self.tags += 1
        return f"MGR{self.tags}"

    def is_referral(self, answer: Response) -> bool:
        return not self.passthrough and referrals.referral_of(answer) is not None

    @staticmethod
    def parse(line: bytes) -> Response:
        try:
            return parser.parse_response([line])
        except parser.ParseError:
            return Response(tag="*", kind="BAD", code=None, text="unparsable")

    # -- the client's command, as it is -------------------------------------------------------

    def forward(self, link: Link, head: Head, intercept: bool = False,
                untagged: Untagged | None = None) -> Response:
        """Send the client's command to ``link`` as it is and relay the answer."""
        if head.big is not None:
            return self.forward_streaming(link, head, head.parts, intercept)
        refused = self.send_parts(link, head.tag, head.parts)
        if refused is not None:
            return self.finish_refused(head, refused, intercept)
        return self.relay_answer(link, head.tag, intercept, untagged=untagged)

    def forward_streaming(self, link: Link, head: Head, parts: list[bytes],
                          intercept: bool = True) -> Response:
        """A command whose last literal is big: the link must say "+" before it streams."""
        refused = self.send_parts(link, head.tag, parts[:-1] + [b""]) if len(parts) > 1 else None
        if refused is None:
            link.send(with_marker(parts[-1], head.big.size, False))
            refused = self.await_continuation(link, head.tag)
        if refused is not None:
            return self.finish_refused(head, refused, intercept)
        if not head.big.nonsync:
            self.client.continuation()
        self.client.stream_literal(link)
        self.stream_rest(link, head.tag)
        return self.relay_answer(link, head.tag)

    def reissue(self, head: Head, link: Link, mailboxes: dict[int, str],
                untagged: Untagged | None = None) -> Response:
        """Send the client's command to ``link`` with the mailbox arguments at the given
        positions replaced (quoted or as literals, never the client's raw text)."""
        args = list(head.command.args)
        for position, mailbox in mailboxes.items():
            args[position] = urls.mutf7_encode(mailbox)
        parts = encode_tokens([Atom(head.tag), Atom(head.name)] + args)
        if head.big is not None:
            parts[-1] += b" {%d}\r\n" % head.big.size
            return self.forward_streaming(link, head, parts, False)
        parts[-1] += b"\r\n"
        return self.forward(link, Head(parts, None), untagged=untagged)

    def send_parts(self, link: Link, tag: str, parts: list[bytes]) -> Response | None:
        """Send command parts (small literals included); a refused literal returns the answer."""
        pending = b""
        for index in range(0, len(parts), 2):
            line = parts[index]
            if index + 1 >= len(parts):
                pending += line
                break
            payload = parts[index + 1]
            if link.literal_plus:
                pending += with_marker(line, len(payload), True) + payload
                continue
            link.send(pending + with_marker(line, len(payload), False))
            refused = self.await_continuation(link, tag)
            if refused is not None:
                return refused
            pending = payload
        if pending:
            link.send(pending)
        return None

    def await_continuation(self, link: Link, tag: str) -> Response | None:
        """Wait for "+" (None) or the command's tagged answer (returned, not forwarded)."""
        while True:
            event = link.next_event()
            if isinstance(event, LiteralChunk):
                self.client.to_client(event.data)
                continue
            if event.data.startswith(b"+"):
                return None
            if event.data.startswith(tag.encode() + b" "):
                return self.parse(event.data)
            self.client.to_client(event.data)

    def stream_rest(self, link: Link, tag: str) -> None:
        """After a streamed literal: the rest of the command (MULTIAPPEND may add literals)."""
        while True:
            event = self.client.next_event()
            if event.literal is None:
                link.send(event.data)
                return
            link.send(with_marker(event.data, event.literal.size, False))
            if self.await_continuation(link, tag) is not None:
                raise LinkDown(link, "refused a literal mid-command")
            if not event.literal.nonsync:
                self.client.continuation()
            self.client.stream_literal(link)

    def finish_refused(self, head: Head, answer: Response, intercept: bool) -> Response:
        """The link answered before taking a literal.  A referral to follow keeps the
        client's pending literal for the referred server; otherwise it is dropped."""
        if intercept and self.is_referral(answer):
            return answer
        self.client.discard_pending(head)
        shown = not self.is_referral(answer)
        text = answer.text if shown else "Mailbox is on another server."
        code = f"[{answer.code.name} {answer.code.text}] ".replace(" ]", "]") if (
            answer.code and shown) else ""
        self.client.reply(head.tag, f"{answer.kind} {code}{text}")
        return answer

    # -- answers ------------------------------------------------------------------------------

    def relay_answer(self, link: Link, tag: str, intercept: bool = False,
                     forward_tagged: bool = True, untagged: Untagged | None = None) -> Response:
        """Forward the link's responses to the client until ``tag``'s tagged answer.

        With ``intercept`` a tagged answer carrying a referral is returned unforwarded;
        ``forward_tagged=False`` keeps the tagged answer (a gateway command's) from the
        client; ``untagged`` may rewrite or drop untagged lines (a dropped line's literals
        go with it).
        """
        prefix = tag.encode() + b" "
        continuation = dropping = False
        while True:
            event = link.next_event()
            if isinstance(event, LiteralChunk):
                if not dropping:
                    self.client.to_client(event.data)
                continue
            line = event.data
            if not continuation and line.startswith(prefix):
                answer = self.parse(line)
                if not forward_tagged or (intercept and self.is_referral(answer)):
                    return answer
                if self.is_referral(answer):   # never shown to a referral-unaware client
                    line = prefix + b"NO [UNAVAILABLE] Mailbox is on another server.\r\n"
                self.client.to_client(line)
                self.client.flush()
                return answer
            if not continuation:
                dropping = False
                if untagged is not None and line.startswith(b"* "):
                    line = untagged(line)
                    dropping = line is None
                if not (dropping or self.passthrough) and b"[REFERRAL " in line[:40].upper():
                    line = _REFERRAL_CODE.sub(b"", line)
                elif not dropping and line[:13].upper() == b"* CAPABILITY ":
                    line = filter_capability_line(line, self.capabilities_kept)
            if not dropping:
                self.client.to_client(line)
            continuation = event.literal is not None

    def gateway_command(self, link: Link, tokens: list,
                        untagged: Untagged | None = drop_all) -> Response:
        """Send a command the gateway built (``tokens`` after the tag, see encode_tokens)
        and return its tagged answer, which the client never sees; its untagged answers
        go through ``untagged`` (by default dropped)."""
        tag = self.next_tag()
        parts = encode_tokens([Atom(tag)] + tokens)
        parts[-1] += b"\r\n"
        refused = self.send_parts(link, tag, parts)
        if refused is not None:
            return refused
        return self.relay_answer(link, tag, forward_tagged=False, untagged=untagged)

    def quiet_continuation(self, link: Link, tag: str) -> bool:
        """True when ``link`` asks for a literal, False when it answered the command."""
        prefix = tag.encode() + b" "
        while True:
            event = link.next_event()
            if isinstance(event, Line):
                if event.data.startswith(b"+"):
                    return True
                if event.data.startswith(prefix):
                    return False

    def quiet_answer(self, link: Link, tag: str) -> Response:
        """The tagged answer to a gateway command on ``link``; its other output is dropped."""
        prefix = tag.encode() + b" "
        while True:
            event = link.next_event()
            if isinstance(event, Line) and event.data.startswith(prefix):
                return self.parse(event.data)
