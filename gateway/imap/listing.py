"""Extended LIST (RFC 5258, 5819, 6154) answered by the gateway over the merged folder list.

The home server lists remote folders only for RLIST / RLSUB, which take two arguments
(RFC 2193 §5), so an extended LIST relayed as it is would show the home folders only.  The
gateway instead asks home for the whole merged tree (``RLIST "" "*"``, and ``RLSUB "" "*"``
when subscriptions matter), selects and decorates the entries itself (\\HasChildren,
\\Subscribed, \\NonExistent, CHILDINFO) and asks each selectable folder's own server for
its STATUS.  The plain two-argument forms still go home as RLIST / RLSUB.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.imap import referrals, urls
from gateway.imap.backend import quote_bytes
from gateway.imap.parser import Atom

SELECTION_OPTIONS = {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
RETURN_OPTIONS = {"CHILDREN", "SUBSCRIBED", "STATUS", "SPECIAL-USE"}
SPECIAL_USE = {"\\ALL", "\\ARCHIVE", "\\DRAFTS", "\\FLAGGED", "\\JUNK", "\\SENT", "\\TRASH"}
CHILD_FLAGS = {"\\HASCHILDREN", "\\HASNOCHILDREN"}
UNSELECTABLE = {"\\NOSELECT", "\\NONEXISTENT"}
MAX_LISTED = 100000          # folders held while one LIST is merged
_STATUS_ITEM = re.compile(r"[A-Za-z0-9-]{1,32}")


@dataclass
class ListRequest:
    """One extended LIST command, its options upper-cased."""
    selection: set[str]
    reference: str
    patterns: list[str]
    returns: set[str]
    status_items: list[str] = field(default_factory=list)

    def wants_subscriptions(self) -> bool:
        return "SUBSCRIBED" in self.selection or "SUBSCRIBED" in self.returns


@dataclass
class Entry:
    name: str                 # as on the wire (modified UTF-7)
    attributes: list[str]
    delimiter: str | None


def _text(token) -> str:
    if isinstance(token, list):
        raise ValueError("a list where a string was expected")
    return token.decode("utf-8", "replace") if isinstance(token, bytes) else str(token)


def parse_list(args: list) -> ListRequest | None:
    """An extended LIST's options (RFC 5258 §3), None for the basic two-argument form;
    ValueError (answered BAD) for a malformed one."""
    args = list(args)
    selection: set[str] = set()
    if args and isinstance(args[0], list):
        selection = {_text(option).upper() for option in args.pop(0)}
    if len(args) < 2:
        raise ValueError("LIST needs a reference and a mailbox pattern")
    reference, pattern, rest = _text(args[0]), args[1], args[2:]
    patterns = [_text(p) for p in pattern] if isinstance(pattern, list) else [_text(pattern)]
    returns, status_items = set(), []
    if rest:
        if len(rest) != 2 or str(rest[0]).upper() != "RETURN" or not isinstance(rest[1], list):
            raise ValueError("LIST RETURN needs a list of options")
        returns, status_items = _return_options(rest[1])
    if not (selection or rest or isinstance(pattern, list)):
        return None
    if not selection <= SELECTION_OPTIONS or not returns <= RETURN_OPTIONS:
        raise ValueError("unknown LIST option")
    if "RECURSIVEMATCH" in selection and selection <= {"RECURSIVEMATCH", "REMOTE"}:
        raise ValueError("RECURSIVEMATCH needs another selection option")   # RFC 5258 §3
    return ListRequest(selection, reference, patterns, returns, status_items)


def _return_options(items: list) -> tuple[set[str], list[str]]:
    returns, status_items, index = set(), [], 0
    while index < len(items):
        name = _text(items[index]).upper()
        returns.add(name)
        index += 1
        if name == "STATUS":
            if index >= len(items) or not isinstance(items[index], list):
                raise ValueError("STATUS needs a list of items")
            status_items = [_text(item).upper() for item in items[index]]
            if not status_items or not all(_STATUS_ITEM.fullmatch(i) for i in status_items):
                raise ValueError("bad STATUS item")
            index += 1
    return returns, status_items


def pattern_regex(reference: str, pattern: str, delimiter: str) -> re.Pattern:
    """RFC 3501 §6.3.8: "*" matches anything, "%" anything but the hierarchy delimiter."""
    other = "[^" + re.escape(delimiter) + "]*" if delimiter else ".*"
    text = "".join(".*" if c == "*" else other if c == "%" else re.escape(c)
                   for c in reference + pattern)
    return re.compile(text, re.DOTALL)


class MergedList:
    """Answers one extended LIST through ``forwarder`` over ``pool``'s links."""

    def __init__(self, forwarder, pool, selected):
        self.forwarder = forwarder
        self.pool = pool
        self.selected = selected    # the selected mailbox's link: its updates reach the client

    def answer(self, tag: str, request: ListRequest) -> None:
        client = self.forwarder.client
        listed = self.collect("RLIST")
        subscribed = self.collect("RLSUB") if request.wants_subscriptions() else {}
        if listed is None or subscribed is None:
            client.reply(tag, "NO [LIMIT] Too many folders to list.")
            return
        for entry, extra in self.select(request, listed, subscribed):
            client.to_client(format_entry("LIST", entry, extra))
            if request.status_items and not UNSELECTABLE & _upper(entry.attributes):
                self.status(entry.name, request.status_items)
        client.reply(tag, "OK List completed.")

    def collect(self, verb: str) -> dict[str, Entry] | None:
        """``verb "" "*"`` at home as {name: Entry}; None past MAX_LISTED."""
        entries: dict[str, Entry] = {}
        shown = self.selected is self.pool.home

        def keep(line: bytes) -> bytes | None:
            response = self.forwarder.parse(line)
            if response.kind in ("LIST", "LSUB") and len(response.args or ()) == 3:
                attributes, delimiter, name = response.args
                if isinstance(attributes, list) and not isinstance(name, list) \
                        and len(entries) <= MAX_LISTED:
                    text = _text(name)
                    entries[text] = Entry(text, [str(a) for a in attributes],
                                          None if str(delimiter).upper() == "NIL" and
                                          isinstance(delimiter, Atom) else _text(delimiter))
                return None
            return line if shown else None

        answer = self.forwarder.gateway_command(self.pool.home, [Atom(verb), b"", b"*"], keep)
        if answer.kind != "OK":
            return {}
        return entries if len(entries) <= MAX_LISTED else None

    def select(self, request: ListRequest, listed: dict[str, Entry],
               subscribed: dict[str, Entry]):
        """(entry, extended data) pairs to answer with, in the home server's order."""
        delimiter = next((e.delimiter for e in listed.values() if e.delimiter), "/")
        regexes = [pattern_regex(request.reference, p, delimiter) for p in request.patterns]
        by_subscription = "SUBSCRIBED" in request.selection
        recursive = "RECURSIVEMATCH" in request.selection
        parents = {p for n in listed for p in _parents(n, delimiter)}
        subscribed_below = {p for n in subscribed for p in _parents(n, delimiter)}
        names = list(listed) + [n for n in subscribed if n not in listed]
        for name in names:
            folded = "INBOX" + name[5:] if name[:5].upper() == "INBOX" else name
            if not any(r.fullmatch(folded) or r.fullmatch(name) for r in regexes):
                continue
            childinfo = recursive and name in subscribed_below
            if by_subscription and name not in subscribed and not childinfo:
                continue
            entry = self.decorate(request, listed.get(name), name in subscribed,
                                  name in parents, name, delimiter)
            if "SPECIAL-USE" in request.selection and not SPECIAL_USE & _upper(entry.attributes):
                continue
            yield entry, b' ("CHILDINFO" ("SUBSCRIBED"))' if childinfo else b""

    @staticmethod
    def decorate(request: ListRequest, found: Entry | None, is_subscribed: bool,
                 has_children: bool, name: str, delimiter: str) -> Entry:
        """The attributes the answer gives ``name`` (RFC 5258 §3, RFC 3348)."""
        attributes = list(found.attributes) if found else ["\\NonExistent"]
        had_child_flag = bool(CHILD_FLAGS & _upper(attributes))
        if found and ("CHILDREN" in request.returns or had_child_flag):
            attributes = [a for a in attributes if a.upper() not in CHILD_FLAGS]
            attributes.append("\\HasChildren" if has_children else "\\HasNoChildren")
        if request.wants_subscriptions() and is_subscribed \
                and "\\SUBSCRIBED" not in _upper(attributes):
            attributes.append("\\Subscribed")
        return Entry(name, attributes, found.delimiter if found else delimiter)

    def status(self, name: str, items: list[str]) -> None:
        """The folder's STATUS from the server that holds it, under the client's name;
        a folder whose STATUS fails gets none (RFC 5819 §2)."""
        tokens = [Atom("STATUS"), name.encode("utf-8"), [Atom(i) for i in items]]
        found: list[bytes] = []
        link = self.pool.home

        def capture(line: bytes) -> bytes | None:
            if line[:9].upper() == b"* STATUS ":
                found.append(line)
                return None
            return line if link is self.selected else None

        answer = self.forwarder.gateway_command(link, tokens, capture)
        referral = referrals.referral_of(answer) if answer.kind == "NO" else None
        if referral:
            remote = self.pool.for_referral(referral)
            if remote is None:
                return
            link, target = remote   # capture() sees the new link
            tokens[1] = urls.mutf7_encode(target.mailbox or "").encode("utf-8")
            found.clear()
            answer = self.forwarder.gateway_command(link, tokens, capture)
        if answer.kind == "OK" and found:
            self.forwarder.client.to_client(renamed_status(found[-1], name.encode("utf-8")))


def renamed_status(line: bytes, wire_name: bytes) -> bytes:
    """A ``* STATUS`` line under the name the client used (a referral may rename)."""
    items = line.rfind(b" (")
    quoted = quote_bytes(wire_name)
    if items < 0 or quoted is None:
        return line
    return b"* STATUS " + quoted + line[items:]


def status_renamer(wire_name: bytes):
    """An ``untagged`` filter (forwarding.Untagged) giving STATUS lines the client's name."""
    def rename(line: bytes) -> bytes:
        if line[:9].upper() == b"* STATUS " and wire_name:
            return renamed_status(line, wire_name)
        return line
    return rename


def format_entry(verb: str, entry: Entry, extra: bytes = b"") -> bytes:
    raw = entry.name.encode("utf-8")
    quoted = quote_bytes(raw)
    name = quoted if quoted is not None else b"{%d}\r\n" % len(raw) + raw
    delimiter = quote_bytes(entry.delimiter.encode()) if entry.delimiter else b"NIL"
    attributes = " ".join(entry.attributes).encode()
    return b"* %s (%s) %s %s%s\r\n" % (verb.encode(), attributes, delimiter, name, extra)


def _upper(words) -> set[str]:
    return {w.upper() for w in words}


def _parents(name: str, delimiter: str) -> list[str]:
    pieces = name.split(delimiter)
    return [delimiter.join(pieces[:i]) for i in range(1, len(pieces))]
