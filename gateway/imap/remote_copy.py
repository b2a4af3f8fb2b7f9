"""COPY / MOVE between mailboxes on different servers, done by the gateway (RFC 2193 §5).

A client that knows nothing of referrals just wants OK, so the gateway FETCHes the messages
from the server of the selected mailbox (``source``) and APPENDs them to the server that
holds the named one (``dest``), each message literal streamed chunk by chunk from one
connection to the other (never held whole); for MOVE it then flags them \\Deleted and UID
EXPUNGEs them at the source.  ``[COPYUID]`` is sent only when every APPEND said where its
message went (RFC 4315 APPENDUID), so it is never made up.

The interface: ``locate(forwarder, home, mailbox)`` says which server holds a mailbox;
``copy_messages(forwarder, head, source, dest, mailbox)`` answers the client's command
itself and raises LinkDown when a link fails.
"""
from __future__ import annotations

import re

from gateway.imap import referrals, urls
from gateway.imap.forwarding import Forwarder, drop_all
from gateway.imap.links import Head, Link
from gateway.imap.parser import Atom, Line

_SEQUENCE = re.compile(r"[0-9:*,$]+")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)", re.I)
_DATE = re.compile(rb'INTERNALDATE "([^"]*)"', re.I)
_UID = re.compile(rb"UID (\d+)", re.I)


def copy_messages(forwarder: Forwarder, head: Head, source: Link, dest: Link,
                  mailbox: str) -> None:
    """Copy (or move) the command's messages from ``source``'s selected mailbox to
    ``mailbox`` on ``dest``, and answer the client."""
    client = forwarder.client
    uid = head.name == "UID"
    args = head.command.args[1:] if uid else head.command.args
    sequence = str(args[0]) if args else ""
    if not _SEQUENCE.fullmatch(sequence):
        client.reply(head.tag, "BAD Invalid sequence set.")
        return
    move = (head.sub or head.name) == "MOVE"
    if move and not source.offers("UIDPLUS"):
        client.reply(head.tag, "NO [CANNOT] This server cannot move messages to that mailbox.")
        return
    copied = _fetch_and_append(forwarder, source, dest, uid, sequence, mailbox)
    if copied is None:
        client.reply(head.tag, "NO [UNAVAILABLE] Copying to the remote mailbox failed.")
        return
    copyuid = _copyuid(copied)
    if move and copied:
        if copyuid:   # RFC 6851 §4.3: MOVE sends COPYUID before the EXPUNGEs
            client.to_client(b"* OK " + copyuid + b" Moved.\r\n")
            copyuid = b""
        if not _expunge(forwarder, source, ",".join(uid for uid, _ in copied)):
            client.reply(head.tag, "NO [CANNOT] Messages were copied but could not be removed "
                                   "from this mailbox.")
            return
    code = copyuid.decode() + " " if copyuid else ""
    client.reply(head.tag, f"OK {code}{'MOVE' if move else 'COPY'} completed.")


def locate(forwarder: Forwarder, home: Link, mailbox: bytes) -> bool | list | str:
    """Where the named mailbox (as on the wire) is, asked of home with a STATUS the client
    never sees: True (home), a referral (URL list), or the NO to answer the client with."""
    answer = forwarder.gateway_command(home, [Atom("STATUS"), mailbox, [Atom("UIDVALIDITY")]],
                                       drop_all)
    referral = referrals.referral_of(answer)
    if referral:
        return referral
    if answer.kind == "OK":
        return True
    code = answer.code.name if answer.code else ""
    if code in ("NONEXISTENT", "TRYCREATE", ""):
        return "NO [TRYCREATE] No such mailbox."
    return f"NO [{code}] {answer.text}"


def _fetch_and_append(forwarder: Forwarder, source: Link, dest: Link, uid: bool,
                      sequence: str, mailbox: str) -> list[tuple[str, str]] | None:
    """(source UID, APPENDUID code text or "") per message copied; None if one failed."""
    box = urls.mutf7_encode(mailbox).encode("utf-8")
    tag = forwarder.next_tag()
    source.send(f"{tag} {'UID ' if uid else ''}FETCH {sequence} "
                "(UID FLAGS INTERNALDATE BODY.PEEK[])\r\n".encode())
    copied, failed = [], False
    prefix = tag.encode() + b" "
    while True:
        event = source.next_event()
        if not isinstance(event, Line):
            continue
        if event.data.startswith(prefix):
            fetched = forwarder.parse(event.data)
            break
        if event.literal is not None and b" FETCH " in event.data[:40]:
            result = _copy_one(forwarder, source, dest, event, box, failed)
            failed = failed or result is None
            if result is not None:
                copied.append(result)
        else:
            forwarder.client.to_client(event.data)   # unsolicited updates of the selected mailbox
    return copied if fetched.kind == "OK" and not failed else None


def _copy_one(forwarder: Forwarder, source: Link, dest: Link, event: Line, box: bytes,
              skip: bool) -> tuple[str, str] | None:
    """APPEND one FETCHed message to ``dest`` while its literal streams from ``source``."""
    header = event.data
    flags = b" ".join(f for f in (_FLAGS.search(header) or [b"", b""])[1].split()
                      if f.lower() != b"\\recent")
    date = _DATE.search(header)
    tag = forwarder.next_tag()
    ok = not skip and _start_append(forwarder, dest, tag, box, flags, date, event.literal.size)
    while True:
        chunk = source.next_event()
        if ok:
            dest.send(chunk.data)
        if chunk.last:
            break
    tail = source.next_event()
    found = _UID.search(header) or _UID.search(tail.data)
    if not ok:
        return None
    dest.send(b"\r\n")
    answer = forwarder.quiet_answer(dest, tag)
    if answer.kind != "OK":
        return None
    appended = answer.code.text if answer.code and answer.code.name == "APPENDUID" else ""
    return (found.group(1).decode() if found else ""), appended


def _start_append(forwarder: Forwarder, dest: Link, tag: str, box: bytes, flags: bytes,
                  date, size: int) -> bool:
    line = b"%s APPEND %s (%s)" % (tag.encode(), _quote(box), flags)
    if date:
        line += b' "' + date.group(1) + b'"'
    if dest.literal_plus:
        dest.send(line + b" {%d+}\r\n" % size)
        return True
    dest.send(line + b" {%d}\r\n" % size)
    return forwarder.quiet_continuation(dest, tag)


def _copyuid(copied: list[tuple[str, str]]) -> bytes:
    """``[COPYUID validity source-uids dest-uids]`` when every APPEND told its UID in one
    UIDVALIDITY, else empty (RFC 4315 §3)."""
    pairs = [appended.split() for _, appended in copied]
    if not copied or any(len(p) != 2 or not all(x.isdigit() for x in p) for p in pairs) \
            or len({p[0] for p in pairs}) != 1 or not all(u for u, _ in copied):
        return b""
    sources = ",".join(u for u, _ in copied)
    return f"[COPYUID {pairs[0][0]} {sources} {','.join(p[1] for p in pairs)}]".encode()


def _expunge(forwarder: Forwarder, source: Link, uid_set: str) -> bool:
    """Flag and UID EXPUNGE exactly the moved messages (RFC 4315); the EXPUNGE responses
    reach the client, whose message numbers they change."""
    shown = None   # untagged answers of the selected mailbox's server go to the client
    stored = forwarder.gateway_command(source, [Atom("UID"), Atom("STORE"), Atom(uid_set),
                                                Atom("+FLAGS.SILENT"), [Atom("\\Deleted")]],
                                       shown)
    if stored.kind != "OK":
        return False
    expunged = forwarder.gateway_command(source, [Atom("UID"), Atom("EXPUNGE"), Atom(uid_set)],
                                         shown)
    return expunged.kind == "OK"


def _quote(box: bytes) -> bytes:
    return b'"' + box.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
