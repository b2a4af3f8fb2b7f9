"""The referral-following relay, used after login when the home back-end offers
MAILBOX-REFERRALS (RFC 2193).

The gateway acts as the referral-capable client: LIST/LSUB go to the home back-end as
RLIST/RLSUB so the client sees every folder; a ``NO [REFERRAL ...]`` answer to a mailbox
command is not shown to the client: the gateway opens (or reuses) an authenticated
connection to the referred server with the session's credentials, re-issues the command
there and relays that answer.  While a remote mailbox is selected, mailbox-scoped commands
go to its connection.  Commands are handled one at a time (a pipelining client is still
served, in order); literals larger than SMALL_LITERAL stream through in chunks.
"""
from __future__ import annotations

import logging
import re
import socket
from collections import deque

import gevent

from gateway.imap import parser, referrals, urls
from gateway.imap import login
from gateway.imap.backend import BackendConnection, filter_capability_line
from gateway.metrics import recorder
from gateway.imap.parser import Atom, Framer, Line, LiteralChunk, Response
from gateway.imap.links import Head, Link, LinkDown, encode_tokens, with_marker
from gateway.imap.remote_copy import cross_server_copy
from gateway.session import ClientGone, LoginError, Target

log = logging.getLogger("mailgate.imap.routing")

SMALL_LITERAL = 65536
FLUSH_AT = 65536

SELECTED_SCOPE = {"FETCH", "STORE", "SEARCH", "EXPUNGE", "CHECK", "SORT", "THREAD", "NOOP",
                  "ESEARCH"}
MAILBOX_COMMANDS = {"STATUS", "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE"}


class RoutingRelay:
    """Serves the logged-in client over the home link and any referred links."""

    def __init__(self, session, home: BackendConnection, password: str, mechanism: str):
        self.session = session
        self.client = session.client
        self.home = Link(home, home.name, self)
        self.password = password          # held for this session only, never logged
        self.mechanism = mechanism
        self.remotes: dict[tuple[str, int, str], Link] = {}
        self.selected: Link | None = None
        self.passthrough = False
        self.out = bytearray()
        self.events: deque = deque()
        self.framer = Framer(max_line=session.settings.max_line)
        self.tags = 0
        self.idling = False
        settings = session.service.config.referrals
        self.allow_passthrough = settings.pass_to_capable_clients

    # -- client side ----------------------------------------------------------------------

    def to_client(self, data: bytes) -> None:
        self.out += data
        if len(self.out) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self.out:
            data, self.out = bytes(self.out), bytearray()
            self.session.send(data)

    def reply(self, tag: str, text: str) -> None:
        self.to_client(f"{tag} {text}\r\n".encode())
        self.flush()

    def next_client_event(self):
        while not self.events:
            if not self.idling:
                self.flush()
            try:
                data = self.client.recv(65536)
            except socket.timeout:
                self.session.try_send(b"* BYE Autologout; idle for too long.\r\n")
                raise ClientGone("client idle timeout") from None
            except OSError as exc:
                raise ClientGone(f"client read error: {exc.strerror or exc}") from None
            if not data:
                raise ClientGone("client closed")
            self.session.bytes_in += len(data)
            self.session.touch()
            try:
                self.events.extend(self.framer.feed(data))
            except parser.ParseError as exc:
                self.events.extend(exc.events)
                if not self.events:
                    self.session.try_send(b"* BYE Command line too long.\r\n")
                    raise ClientGone(f"protocol error: {exc}") from None
        return self.events.popleft()

    def read_head(self) -> Head:
        """Read a command up to its end, or up to a literal too big to hold."""
        parts: list[bytes] = []
        while True:
            event = self.next_client_event()
            if not isinstance(event, Line):
                continue
            parts.append(event.data)
            if event.literal is None:
                return Head(parts, None)
            if event.literal.size > SMALL_LITERAL:
                return Head(parts, event.literal)
            if not event.literal.nonsync:
                self.session.send(b"+ Ready for literal data.\r\n")
            parts.append(self.read_literal(event.literal.size))

    def read_literal(self, size: int) -> bytes:
        payload = bytearray()
        while len(payload) < size or size == 0:
            chunk = self.next_client_event()
            payload += chunk.data
            if chunk.last:
                break
        return bytes(payload)

    def stream_literal(self, link: Link | None) -> None:
        """Pass the client's pending literal to ``link`` chunk by chunk (None = discard)."""
        while True:
            chunk = self.next_client_event()
            if link is not None:
                link.send(chunk.data)
            if chunk.last:
                return

    # -- main loop ----------------------------------------------------------------------------

    def run(self, client_pending: bytes, backend_pending: bytes) -> str:
        """Serve until LOGOUT or failure; returns the reason for the session log."""
        self.home.backend.unbounded(self.session.settings.idle_timeout)
        self.client.settimeout(self.session.settings.idle_timeout)
        if backend_pending:
            self.session.send(backend_pending)
        if client_pending:
            self.events.extend(self.framer.feed(client_pending))
        try:
            while True:
                head = self.read_head()
                if not self.dispatch(head):
                    return "logout"
        except LinkDown as down:
            self.session.try_send(b"* BYE [UNAVAILABLE] Connection to the mail server lost.\r\n")
            return f"backend {down.link.name}: {down}"
        finally:
            self.password = ""
            for link in self.remotes.values():
                link.close()

    def dispatch(self, head: Head) -> bool:
        """Handle one command; False after LOGOUT."""
        name = head.sub if head.name == "UID" else head.name
        if head.name == "LOGOUT":
            self.forward(self.home, head)
            return False
        handler = {
            "LIST": self.cmd_list, "LSUB": self.cmd_list, "RLIST": self.cmd_list,
            "RLSUB": self.cmd_list, "SELECT": self.cmd_select, "EXAMINE": self.cmd_select,
            "APPEND": self.cmd_append, "RENAME": self.cmd_rename, "IDLE": self.cmd_idle,
            "CLOSE": self.cmd_close, "UNSELECT": self.cmd_close,
            "COPY": self.cmd_copy, "MOVE": self.cmd_copy,
        }.get(name)
        if handler is None and name in MAILBOX_COMMANDS:
            handler = self.cmd_mailbox
        if handler is None:
            link = self.selected_link() if name in SELECTED_SCOPE or head.sub else self.home
            handler = lambda h: self.guarded(link, lambda: self.forward(link, h))  # noqa: E731
        handler(head)
        return True

    def selected_link(self) -> Link:
        return self.selected or self.home

    def guarded(self, link: Link, action) -> Response | None:
        """Run an action on a remote link; its failure becomes a NO, not the session's end."""
        try:
            return action()
        except LinkDown as down:
            if down.link is self.home:
                raise
            self.drop(down.link)
            return None

    def drop(self, link: Link) -> None:
        log.warning("session=%s remote %s lost: closing it", self.session.id, link.name)
        self.remotes = {k: v for k, v in self.remotes.items() if v is not link}
        if self.selected is link:
            self.selected = None
        link.close()

    # -- sending a command and relaying its answer -------------------------------------------

    def next_tag(self) -> str:
        self.tags += 1
        return f"MGR{self.tags}"

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
                self.to_client(event.data)
                continue
            if event.data.startswith(b"+"):
                return None
            if event.data.startswith(tag.encode() + b" "):
                return self.parse(event.data)
            self.to_client(event.data)

    def relay_answer(self, link: Link, tag: str, intercept: bool = False,
                     forward_tagged: bool = True) -> Response:
        """Forward the link's responses to the client until ``tag``'s tagged answer.

        With ``intercept`` a tagged answer carrying a referral is returned unforwarded;
        ``forward_tagged=False`` keeps every tagged answer (a gateway command's) from the client.
        """
        prefix = tag.encode() + b" "
        continuation = False
        while True:
            event = link.next_event()
            if isinstance(event, LiteralChunk):
                self.to_client(event.data)
                continue
            line = event.data
            if not continuation and line.startswith(prefix):
                answer = self.parse(line)
                if not forward_tagged or (intercept and self.is_referral(answer)):
                    return answer
                if self.is_referral(answer):   # never shown to a referral-unaware client
                    line = prefix + b"NO [UNAVAILABLE] Mailbox is on another server.\r\n"
                self.to_client(line)
                self.flush()
                return answer
            if not (continuation or self.passthrough) and line.startswith(b"* ") \
                    and b"[REFERRAL " in line[:40].upper():
                line = re.sub(rb"\[REFERRAL [^]]*\] ?", b"", line, flags=re.I)
            if not continuation and line[:13].upper() == b"* CAPABILITY ":
                line = filter_capability_line(
                    line, ("MAILBOX-REFERRALS",) if self.allow_passthrough else ())
            self.to_client(line)
            continuation = event.literal is not None

    def is_referral(self, answer: Response) -> bool:
        return not self.passthrough and referrals.referral_of(answer) is not None

    def parse(self, line: bytes) -> Response:
        try:
            return parser.parse_response([line])
        except parser.ParseError:
            return Response(tag="*", kind="BAD", code=None, text="unparsable")

    def forward(self, link: Link, head: Head, intercept: bool = False) -> Response:
        """Send the client's command to ``link`` as it is and relay the answer."""
        parts = head.parts
        if head.big is not None:
            return self.forward_streaming(link, head, parts, intercept)
        refused = self.send_parts(link, head.tag, parts)
        if refused is not None:
            return self.finish_refused(head, refused, intercept)
        return self.relay_answer(link, head.tag, intercept)

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
            self.session.send(b"+ Ready for literal data.\r\n")
        self.stream_literal(link)
        self.stream_rest(link, head.tag)
        return self.relay_answer(link, head.tag)

    def stream_rest(self, link: Link, tag: str) -> None:
        """After a streamed literal: the rest of the command (MULTIAPPEND may add literals)."""
        while True:
            event = self.next_client_event()
            if event.literal is None:
                link.send(event.data)
                return
            link.send(with_marker(event.data, event.literal.size, False))
            refused = self.await_continuation(link, tag)
            if refused is not None:
                raise LinkDown(link, "refused a literal mid-command")
            if not event.literal.nonsync:
                self.session.send(b"+ Ready for literal data.\r\n")
            self.stream_literal(link)

    def finish_refused(self, head: Head, answer: Response, intercept: bool) -> Response:
        """The link answered before taking a literal.  A referral to follow keeps the
        client's pending literal for the referred server; otherwise it is dropped."""
        if intercept and self.is_referral(answer):
            return answer
        self.discard_pending(head)
        text = answer.text if not self.is_referral(answer) else "Mailbox is on another server."
        code = f"[{answer.code.name} {answer.code.text}] ".replace(" ]", "]") if (
            answer.code and not self.is_referral(answer)) else ""
        self.reply(head.tag, f"{answer.kind} {code}{text}")
        return answer

    def discard_pending(self, head: Head) -> None:
        """Read and drop a non-synchronising literal the client is already sending."""
        if head.big is not None and head.big.nonsync:
            head.big = None
            self.stream_literal(None)
            self.drain_rest()

    def drain_rest(self) -> None:
        while True:
            event = self.next_client_event()
            if isinstance(event, Line) and event.literal is None:
                return
            if isinstance(event, Line):
                self.stream_literal(None)

    # -- remote links -------------------------------------------------------------------------

    def remote_for(self, answer: Response, index: int = 0) -> tuple[Link, Target] | None:
        """An authenticated link to the referral's first reachable allowed target."""
        referral = referrals.referral_of(answer) or []
        if index:
            referral = referral[index:index + 1]
        policy = self.session.service.referral_policy
        for target in policy.targets(referral, self.session.backend_login_name, self.session.id):
            try:
                link = self.open_link(target)
                recorder.referral("mailbox")
                return link, target
            except LinkDown as down:
                log.warning("session=%s referred server %s unavailable: %s", self.session.id,
                            target.config.name, down)
        return None

    def open_link(self, target: Target) -> Link:
        key = (target.config.address.lower(), target.config.imap_port, target.login_name)
        if key in self.remotes:
            return self.remotes[key]
        try:
            backend, _ = login.open_backend(target, login.Credentials(self.password, self.mechanism),
                                            self.session.id_fields())
        except referrals.Referred as referred:
            if referred.kept is None:
                raise LinkDown(None, referred.detail) from None
            backend = referred.kept[0]      # OK [REFERRAL]: logged in; not followed further
        except LoginError as exc:
            raise LinkDown(None, exc.detail) from None
        backend.unbounded(self.session.settings.idle_timeout)
        link = Link(backend, target.config.name, self)
        self.remotes[key] = link
        log.info("session=%s opened referred connection to %s", self.session.id, link.name)
        return link

    def unavailable(self, head: Head) -> None:
        self.reply(head.tag, "NO [UNAVAILABLE] The mailbox is on a server that cannot be reached.")

    def reissue(self, head: Head, link: Link, mailboxes: list[str]) -> Response | None:
        """Send the client's command to ``link`` with its mailbox argument(s) replaced."""
        args = list(head.command.args)
        for position, mailbox in enumerate(mailboxes):
            args[position] = urls.mutf7_encode(mailbox)
        parts = encode_tokens([Atom(head.tag), Atom(head.name)] + args)
        if head.big is not None:
            parts[-1] += b" {%d}\r\n" % head.big.size
            return self.guarded(link, lambda: self.forward_streaming(link, head, parts, False))
        parts[-1] += b"\r\n"
        rebuilt = Head(parts, None)
        return self.guarded(link, lambda: self.forward(link, rebuilt))

    def follow(self, head: Head, answer: Response) -> tuple[Link, Response] | None:
        """Follow a mailbox referral for a one-mailbox command; None when answered already."""
        found = self.remote_for(answer)
        if found is None or head.command is None:
            self.discard_pending(head)
            self.unavailable(head)
            return None
        link, target = found
        result = self.reissue(head, link, [target.mailbox or ""])
        if result is None:
            self.discard_pending(head)
            self.unavailable(head)
            return None
        return link, result

    # -- commands -------------------------------------------------------------------------------

    def cmd_list(self, head: Head) -> None:
        """LIST/LSUB become RLIST/RLSUB so remote folders are listed too (RFC 2193 §4)."""
        if head.name.startswith("R") and self.allow_passthrough:
            self.passthrough = True   # a referral-capable client (RFC 2193 §6)
        if head.name in ("LIST", "LSUB") and head.command is not None and len(head.command.args) == 2:
            tag, verb, rest = head.parts[0].split(b" ", 2)
            head = Head([tag + b" R" + verb + b" " + rest] + head.parts[1:], head.big)
        self.forward(self.home, head)

    def cmd_select(self, head: Head) -> None:
        previous = self.selected
        answer = self.forward(self.home, head, intercept=True)
        if self.is_referral(answer):
            followed = self.follow(head, answer)
            self.selected = followed[0] if followed and followed[1].kind == "OK" else None
        else:
            self.selected = self.home if answer.kind == "OK" else None
        if previous is not None and previous is not self.home and previous is not self.selected:
            self.quietly(previous, "UNSELECT")

    def quietly(self, link: Link, command: str) -> None:
        """A gateway command whose answers the client never sees."""
        tag = self.next_tag()
        try:
            link.send(f"{tag} {command}\r\n".encode())
            self.quiet_answer(link, tag)
        except LinkDown:
            self.drop(link)

    def quiet_answer(self, link: Link, tag: str) -> Response:
        """The tagged answer to a gateway command on ``link``; its other output is dropped."""
        prefix = tag.encode() + b" "
        while True:
            event = link.next_event()
            if isinstance(event, Line) and event.data.startswith(prefix):
                return self.parse(event.data)

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

    def quiet_home(self, command: str) -> Response:
        """A gateway command on the home link whose untagged answers the client does see
        (EXPUNGE after a cross-server MOVE changes the client's message numbers)."""
        tag = self.next_tag()
        self.home.send(f"{tag} {command}\r\n".encode())
        return self.relay_answer(self.home, tag, forward_tagged=False)

    def cmd_close(self, head: Head) -> None:
        link = self.selected_link()
        answer = self.guarded(link, lambda: self.forward(link, head))
        if answer is None:
            self.unavailable(head)
        elif answer.kind == "OK":
            self.selected = None

    def cmd_mailbox(self, head: Head) -> None:
        answer = self.forward(self.home, head, intercept=True)
        if self.is_referral(answer):
            self.follow(head, answer)

    def cmd_append(self, head: Head) -> None:
        answer = self.forward(self.home, head, intercept=True)
        if self.is_referral(answer):
            self.follow(head, answer)

    def cmd_rename(self, head: Head) -> None:
        """RFC 2193 §5: RENAME is referred with a URL pair on one server."""
        answer = self.forward(self.home, head, intercept=True)
        if not self.is_referral(answer):
            return
        pair = referrals.referral_of(answer)
        found = self.remote_for(answer) if len(pair) == 2 and head.command else None
        if found is None or pair[0].host != pair[1].host or pair[0].port != pair[1].port:
            self.unavailable(head)
            return
        link, target = found
        if self.reissue(head, link, [target.mailbox or "", pair[1].mailbox or ""]) is None:
            self.unavailable(head)

    def cmd_idle(self, head: Head) -> None:
        """IDLE on the selected link; the client's DONE goes to the same link."""
        link = self.selected_link()
        link.send(head.parts[0])
        refused = self.guarded(link, lambda: self.await_continuation(link, head.tag))
        if refused is not None:
            self.reply(head.tag, f"{refused.kind} {refused.text}")
            return
        self.to_client(b"+ idling\r\n")
        self.flush()
        waiter = gevent.spawn(self.relay_answer, link, head.tag)
        main = gevent.getcurrent()
        waiter.link_exception(lambda done: main.kill(done.exception, block=False))
        self.idling = True
        try:
            while not waiter.ready():
                event = self.next_client_event()   # the client's DONE
                link.send(event.data)
                if isinstance(event, Line) and event.literal is None:
                    break
            waiter.join()
        finally:
            self.idling = False
            waiter.unlink_all()
            waiter.kill()

    def cmd_copy(self, head: Head) -> None:
        """COPY/MOVE: into a remote mailbox the gateway copies itself (FETCH + APPEND)."""
        link = self.selected_link()
        answer = self.guarded(link, lambda: self.forward(link, head, intercept=True))
        if answer is None:
            self.unavailable(head)
            return
        if not self.is_referral(answer):
            return
        found = self.remote_for(answer) if link is self.home else None
        if found is None or head.command is None:
            self.unavailable(head)
            return
        remote, target = found
        cross_server_copy(self, head, remote, target.mailbox or "")
