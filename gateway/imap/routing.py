"""The referral-following relay, used after login when the home back-end offers
MAILBOX-REFERRALS (RFC 2193): which command goes where.

The gateway acts as the referral-capable client: LIST/LSUB go to the home back-end as
RLIST/RLSUB so the client sees every folder (extended LIST is merged by listing.py); a
``NO [REFERRAL ...]`` answer to a mailbox command is not shown to the client: the gateway
opens (or reuses) a logged-in connection to the referred server (links.LinkPool) and
re-issues the command there (forwarding.Forwarder).  While a remote mailbox is selected,
mailbox-scoped commands go to its connection.  Commands are handled one at a time (a
pipelining client is still served, in order).

The pieces: ``COMMANDS`` (command name → method), ``REMOTE_NEEDS`` (what a referred server
must offer for a command sent to it), ``HOME_ONLY`` (capabilities the gateway or the home
server provide whatever mailbox is selected).
"""
from __future__ import annotations

import re

import gevent

from gateway.imap import referrals, urls
from gateway.imap.backend import BackendConnection, filter_capabilities
from gateway.imap.forwarding import ClientSide, Forwarder, drop_all
from gateway.imap.links import Head, Link, LinkDown, LinkPool, referred_opener
from gateway.imap.listing import MergedList, parse_list, status_renamer
from gateway.imap.parser import Atom, Line, Response
from gateway.imap.remote_copy import copy_messages, locate

# Command (UID's sub-command for UID) → method; anything else goes to the home server.
COMMANDS = {
    "LOGOUT": "cmd_logout", "CAPABILITY": "cmd_capability", "ENABLE": "cmd_enable",
    "LIST": "cmd_list", "LSUB": "cmd_list", "RLIST": "cmd_list", "RLSUB": "cmd_list",
    "SELECT": "cmd_select", "EXAMINE": "cmd_select", "STATUS": "cmd_status",
    "APPEND": "cmd_mailbox", "CREATE": "cmd_mailbox", "DELETE": "cmd_mailbox",
    "SUBSCRIBE": "cmd_mailbox", "UNSUBSCRIBE": "cmd_mailbox", "RENAME": "cmd_rename",
    "IDLE": "cmd_idle", "CLOSE": "cmd_close", "UNSELECT": "cmd_close",
    "COPY": "cmd_copy", "MOVE": "cmd_copy",
    **{name: "cmd_selected" for name in (
        "FETCH", "STORE", "SEARCH", "EXPUNGE", "CHECK", "SORT", "THREAD", "NOOP", "ESEARCH")},
}

# A command for the selected mailbox sent to a referred server needs that server to offer
# this (RFC 3501 §7.2.1: a client may use only what was advertised).  Keys are names as in
# COMMANDS, "UID " + sub-command for UID forms; a trailing "=" matches any value.
REMOTE_NEEDS = {
    "MOVE": "MOVE", "UID MOVE": "MOVE", "UID EXPUNGE": "UIDPLUS", "IDLE": "IDLE",
    "UNSELECT": "UNSELECT", "SORT": "SORT", "UID SORT": "SORT", "THREAD": "THREAD=",
    "UID THREAD": "THREAD=", "ESEARCH": "ESEARCH",
}

_EXTENSION = re.compile(r"[A-Za-z0-9=+.-]{1,64}")

# Capabilities that hold whatever server the selected mailbox is on: the home server or the
# gateway itself serves them (literals are re-encoded for each link; LIST is merged here).
HOME_ONLY = frozenset({"IMAP4REV1", "LITERAL+", "LITERAL-", "ID", "NAMESPACE", "CHILDREN",
                       "LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "ENABLE"})


class RoutingRelay:
    """Serves the logged-in client over the home link and any referred links."""

    def __init__(self, session, home: BackendConnection, password: str, mechanism: str):
        self.session = session
        settings = session.service.config.referrals
        self.allow_passthrough = settings.pass_to_capable_clients
        self.client = ClientSide(session, self.keepalive, settings.home_keepalive)
        self.forwarder = Forwarder(self.client, session.capabilities_kept())
        # The credentials stay in the opener's closure for this session only, never logged.
        self.pool = LinkPool(Link(home, home.name, self.client.flush),
                             referred_opener(session, password, mechanism),
                             session.service.referral_policy, session.backend_login_name,
                             session.id)
        self.home = self.pool.home
        self.keepalive_every = settings.home_keepalive
        self.selected: Link | None = None
        self.busy: Link | None = None     # in IDLE: the keepalive leaves it alone
        self.enabled: set[str] = set()    # extensions home said ENABLED (RFC 5161)
        self.pool.after_open = self.enable

    # -- main loop ----------------------------------------------------------------------------

    def run(self, client_pending: bytes, backend_pending: bytes) -> str:
        """Serve until LOGOUT or failure; returns the reason for the session log."""
        self.home.backend.unbounded(self.session.settings.idle_timeout)
        if backend_pending:
            self.session.send(backend_pending)
        self.client.feed(client_pending)
        try:
            while True:
                head = self.next_command()
                if not self.dispatch(head):
                    return "logout"
        except LinkDown as down:
            self.session.try_send(b"* BYE [UNAVAILABLE] Connection to the mail server lost.\r\n")
            return f"backend {down.link.name}: {down}"
        finally:
            self.pool.close()

    def next_command(self) -> Head:
        """The client's next command; between commands the links are kept alive (also
        while the client keeps busy on another link, so its silence never comes)."""
        self.keepalive()
        self.client.ticking = True
        try:
            return self.client.read_head()
        finally:
            self.client.ticking = False

    def dispatch(self, head: Head) -> bool:
        """Handle one command through COMMANDS; False after LOGOUT."""
        name = head.sub if head.name == "UID" else head.name
        method = getattr(self, COMMANDS.get(name, "cmd_home"))
        return method(head) is not False

    def selected_link(self) -> Link:
        return self.selected or self.home

    def guarded(self, link: Link, action) -> Response | None:
        """Run an action on a remote link; its failure becomes None, not the session's end."""
        try:
            return action()
        except LinkDown as down:
            if down.link is self.home:
                raise
            self.drop(down.link)
            return None

    def drop(self, link: Link) -> None:
        self.pool.drop(link)
        if self.selected is link:
            self.selected = None

    def unavailable(self, head: Head) -> None:
        self.client.discard_pending(head)
        self.client.reply(head.tag,
                          "NO [UNAVAILABLE] The mailbox is on a server that cannot be reached.")

    # -- links --------------------------------------------------------------------------------

    def keepalive(self) -> None:
        """NOOP every link unused for ``[referrals] home_keepalive`` seconds, so that no
        back-end logs the session out while the client works on another server."""
        for link in self.pool.unused(self.keepalive_every * 0.9, self.busy):
            shown = link is self.selected_link()   # its updates are the client's
            if self.guarded(link, lambda: self.forwarder.gateway_command(
                    link, [Atom("NOOP")], None if shown else drop_all)) is not None and shown:
                self.client.flush()

    def enable(self, link: Link) -> None:
        """What the client ENABLEd at home, on a referred link too (RFC 5161), so that a
        remote mailbox behaves as it asked (QRESYNC SELECT parameters, CONDSTORE MODSEQs)."""
        if self.enabled and link.offers("ENABLE"):
            words = [Atom(word) for word in sorted(self.enabled)]
            self.guarded(link, lambda: self.forwarder.gateway_command(
                link, [Atom("ENABLE"), *words]))

    def follow(self, head: Head, answer: Response, positions=(0,), untagged=None):
        """Follow a mailbox referral for the command (its mailbox at ``positions``):
        (link, answer) when it ran there, None when the client has its answer already."""
        referral = referrals.referral_of(answer) or []
        # One mailbox: the URLs are replicas, best first; RENAME: an (old, new) pair.
        found = self.pool.for_referral(referral if len(positions) == 1 else referral[:1])
        if found is None or head.command is None:
            self.unavailable(head)
            return None
        link, target = found
        names = {positions[0]: target.mailbox or ""}
        if len(positions) > 1:
            names[positions[1]] = referral[1].mailbox or ""
        result = self.guarded(link, lambda: self.forwarder.reissue(head, link, names, untagged))
        if result is None:
            self.unavailable(head)
            return None
        return link, result

    def refuse_unoffered(self, link: Link, head: Head) -> bool:
        """True (and the client answered NO) when ``link`` is a referred server that does
        not offer what the command needs."""
        if link is self.home or (key := lacking(link, head)) is None:
            return False
        self.client.discard_pending(head)
        self.client.reply(head.tag, f"NO [CANNOT] {key} is not supported for this mailbox.")
        return True

    # -- commands -----------------------------------------------------------------------------

    def cmd_home(self, head: Head) -> None:
        self.forwarder.forward(self.home, head)

    def cmd_enable(self, head: Head) -> None:
        def note(line: bytes) -> bytes:
            if line[:10].upper() == b"* ENABLED ":
                self.enabled.update(w for w in line[10:].decode("ascii", "replace").split()
                                    if _EXTENSION.fullmatch(w))
            return line
        self.forwarder.forward(self.home, head, untagged=note)
        for link in list(self.pool.remotes.values()):
            self.enable(link)

    def cmd_logout(self, head: Head) -> bool:
        self.forwarder.forward(self.home, head)
        return False

    def cmd_selected(self, head: Head) -> None:
        link = self.selected_link()
        if not self.refuse_unoffered(link, head) and \
                self.guarded(link, lambda: self.forwarder.forward(link, head)) is None:
            self.unavailable(head)

    def cmd_capability(self, head: Head) -> None:
        """What the client may use now: home's list as filtered at login, less what the
        selected mailbox's server lacks (the gateway cannot lend a server an extension)."""
        words = filter_capabilities(self.home.backend.capability_words,
                                    self.forwarder.capabilities_kept)
        remote = self.selected if self.selected is not self.home else None
        self.client.to_client(b"* CAPABILITY " + advertised(words, remote) + b"\r\n")
        self.client.reply(head.tag, "OK Capability completed.")

    def cmd_list(self, head: Head) -> None:
        """LIST/LSUB become RLIST/RLSUB so remote folders are listed too (RFC 2193 §4);
        extended LIST forms (RFC 5258) are merged by the gateway."""
        if head.name.startswith("R") and self.allow_passthrough:
            self.forwarder.passthrough = True   # a referral-capable client (RFC 2193 §6)
        if head.name == "LIST" and head.command is not None:
            try:
                request = parse_list(head.command.args)
            except ValueError as exc:
                self.client.reply(head.tag, f"BAD {exc}.")
                return
            if request is not None:
                MergedList(self.forwarder, self.pool, self.selected_link()).answer(
                    head.tag, request)
                return
        if head.name in ("LIST", "LSUB") and head.command is not None \
                and len(head.command.args) == 2:
            tag, verb, rest = head.parts[0].split(b" ", 2)
            head = Head([tag + b" R" + verb + b" " + rest] + head.parts[1:], head.big)
        self.forwarder.forward(self.home, head)

    def cmd_select(self, head: Head) -> None:
        previous = self.selected
        answer = self.forwarder.forward(self.home, head, intercept=True)
        if self.forwarder.is_referral(answer):
            followed = self.follow(head, answer)
            self.selected = followed[0] if followed and followed[1].kind == "OK" else None
        else:
            self.selected = self.home if answer.kind == "OK" else None
        if previous is not None and previous is not self.home and previous is not self.selected:
            self.leave(previous)

    def leave(self, link: Link) -> None:
        """Deselect a referred server's mailbox without expunging; its later updates must
        not reach the client as if they were of the new mailbox's."""
        if link.offers("UNSELECT"):
            self.guarded(link, lambda: self.forwarder.gateway_command(link, [Atom("UNSELECT")]))
        else:
            self.pool.drop(link)

    def cmd_close(self, head: Head) -> None:
        link = self.selected_link()
        if self.refuse_unoffered(link, head):
            return
        answer = self.guarded(link, lambda: self.forwarder.forward(link, head))
        if answer is None:
            self.unavailable(head)
        elif answer.kind == "OK":
            self.selected = None

    def cmd_mailbox(self, head: Head) -> None:
        answer = self.forwarder.forward(self.home, head, intercept=True)
        if self.forwarder.is_referral(answer):
            self.follow(head, answer)

    def cmd_status(self, head: Head) -> None:
        """STATUS, shown under the client's mailbox name even when the referral renames it."""
        answer = self.forwarder.forward(self.home, head, intercept=True)
        if not self.forwarder.is_referral(answer):
            return
        mailbox = head.command.args[0] if head.command and head.command.args else b""
        self.follow(head, answer, untagged=status_renamer(_wire(mailbox)))

    def cmd_rename(self, head: Head) -> None:
        """RFC 2193 §5: RENAME is referred with a URL pair on one server."""
        answer = self.forwarder.forward(self.home, head, intercept=True)
        if not self.forwarder.is_referral(answer):
            return
        pair = referrals.referral_of(answer)
        if len(pair) != 2 or (pair[0].host, pair[0].port) != (pair[1].host, pair[1].port):
            self.unavailable(head)
            return
        self.follow(head, answer, positions=(0, 1))

    def cmd_idle(self, head: Head) -> None:
        """IDLE on the selected link; the client's DONE goes to the same link, and the
        link's updates reach the client as they come."""
        link = self.selected_link()
        if self.refuse_unoffered(link, head):
            return
        link.send(head.parts[0])
        refused = self.guarded(link, lambda: self.forwarder.await_continuation(link, head.tag))
        if refused is not None:
            self.client.reply(head.tag, f"{refused.kind} {refused.text}")
            return
        self.client.to_client(b"+ idling\r\n")
        self.client.flush()
        waiter = gevent.spawn(self.forwarder.relay_answer, link, head.tag)
        main = gevent.getcurrent()
        waiter.link_exception(lambda done: main.kill(done.exception, block=False))
        self.client.idling, self.client.ticking, self.busy = True, True, link
        try:
            while not waiter.ready():
                event = self.client.next_event()   # the client's DONE
                link.send(event.data)
                if isinstance(event, Line) and event.literal is None:
                    break
            waiter.join()
        finally:
            self.client.idling, self.client.ticking, self.busy = False, False, None
            waiter.unlink_all()
            waiter.kill()

    # -- COPY / MOVE --------------------------------------------------------------------------

    def cmd_copy(self, head: Head) -> None:
        """COPY/MOVE reach the mailbox the client named, wherever each side is: forwarded
        when both are on one server, copied by the gateway (FETCH + APPEND) otherwise."""
        source = self.selected_link()
        if head.command is None or len(head.command.args) < 2:
            self.cmd_selected(head)
            return
        if source is self.home:
            answer = self.forwarder.forward(self.home, head, intercept=True)
            if self.forwarder.is_referral(answer):
                self.copy_across(head, source, referrals.referral_of(answer))
            return
        where = locate(self.forwarder, self.home, _wire(head.command.args[-1]))
        if isinstance(where, str):
            self.client.reply(head.tag, where)
        elif where is True:
            name = urls.mutf7_decode(_wire(head.command.args[-1]).decode("utf-8", "replace"))
            self.copy_between(head, source, self.home, name)
        else:
            self.copy_across(head, source, where)

    def copy_across(self, head: Head, source: Link, referral) -> None:
        found = self.pool.for_referral(referral)
        if found is None:
            self.unavailable(head)
            return
        dest, target = found
        if dest is source:   # both on one server: let it copy, under its own name
            if not self.refuse_unoffered(source, head):
                names = {len(head.command.args) - 1: target.mailbox or ""}
                if self.guarded(source, lambda: self.forwarder.reissue(head, source, names)) \
                        is None:
                    self.unavailable(head)
            return
        self.copy_between(head, source, dest, target.mailbox or "")

    def copy_between(self, head: Head, source: Link, dest: Link, mailbox: str) -> None:
        try:
            copy_messages(self.forwarder, head, source, dest, mailbox)
        except LinkDown as down:
            if down.link is self.home or down.link is None:
                raise
            self.drop(down.link)
            self.unavailable(head)


def lacking(link: Link, head: Head) -> str | None:
    """The command's name when ``link``'s server does not offer what it needs."""
    key = f"UID {head.sub}" if head.name == "UID" else head.name
    needed = REMOTE_NEEDS.get(key)
    return key if needed is not None and not link.offers(needed) else None


def advertised(words: bytes, remote: Link | None) -> bytes:
    """The capability words (as filtered for the client) less what ``remote``, the server
    of the selected mailbox, lacks; HOME_ONLY ones hold wherever the mailbox is."""
    return b" ".join(w for w in words.split() if remote is None
                     or w.upper().decode() in HOME_ONLY or remote.offers(w.upper().decode()))


def _wire(token) -> bytes:
    """A mailbox argument as the client sent it (modified UTF-7 on the wire)."""
    if isinstance(token, list):
        return b""
    return token if isinstance(token, bytes) else str(token).encode("utf-8")

