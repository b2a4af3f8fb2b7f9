"""COPY / MOVE into a mailbox on another server, done by the gateway (RFC 2193 §5).

The home back-end answers COPY with a referral; a client that knows nothing of referrals
just wants OK.  So the gateway FETCHes the messages from home and APPENDs them to the
referred server, each message literal streamed chunk by chunk from one connection to the
other (never held whole), then for MOVE flags them \\Deleted and UID EXPUNGEs them at home.
"""
from __future__ import annotations

import re

from gateway.imap import urls
from gateway.imap.parser import Line

_SEQUENCE = re.compile(r"[0-9:*,$]+")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)", re.I)
_DATE = re.compile(rb'INTERNALDATE "([^"]*)"', re.I)
_UID = re.compile(rb"UID (\d+)", re.I)


def cross_server_copy(relay, head, remote, mailbox: str) -> None:
    """Copy (or move) the command's messages from home to ``mailbox`` on ``remote``."""
    uid = head.name == "UID"
    args = head.command.args[1:] if uid else head.command.args
    sequence = str(args[0]) if args else ""
    if not _SEQUENCE.fullmatch(sequence):
        relay.reply(head.tag, "BAD Invalid sequence set.")
        return
    move = (head.sub or head.name) == "MOVE"
    home = relay.home
    box = relay_quote(urls.mutf7_encode(mailbox))
    tag = relay.next_tag()
    home.send(f"{tag} {'UID ' if uid else ''}FETCH {sequence} "
              "(UID FLAGS INTERNALDATE BODY.PEEK[])\r\n".encode())
    copied, failed = [], False
    prefix = tag.encode() + b" "
    while True:
        event = home.next_event()
        if not isinstance(event, Line):
            continue
        if event.data.startswith(prefix):
            fetched = relay.parse(event.data)
            break
        if event.literal is not None and b" FETCH " in event.data[:40]:
            message_uid, ok = copy_one(relay, remote, event, box, failed)
            if ok and message_uid:
                copied.append(message_uid)
            else:
                failed = True
        else:
            relay.to_client(event.data)   # unsolicited updates of the client's mailbox
    if fetched.kind != "OK" or failed:
        relay.reply(head.tag, "NO [UNAVAILABLE] Copying to the remote mailbox failed.")
        return
    if move and copied:
        uid_set = ",".join(copied)
        stored = relay.quiet_home(f"UID STORE {uid_set} +FLAGS.SILENT (\\Deleted)")
        # RFC 4315 UID EXPUNGE removes only these messages (EXPUNGE responses reach the client).
        expunged = relay.quiet_home(f"UID EXPUNGE {uid_set}") if stored.kind == "OK" else stored
        if expunged.kind != "OK":
            relay.reply(head.tag, "NO [CANNOT] Messages were copied but could not be removed "
                                  "from this mailbox.")
            return
    relay.reply(head.tag, f"OK {'MOVE' if move else 'COPY'} completed.")


def copy_one(relay, remote, event: Line, box: bytes, skip: bool) -> tuple[str, bool]:
    """APPEND one FETCHed message to ``remote`` while its literal streams from home."""
    header = event.data
    flags = b" ".join(f for f in (_FLAGS.search(header) or [b"", b""])[1].split()
                      if f.lower() != b"\\recent")
    date = _DATE.search(header)
    size = event.literal.size
    tag = relay.next_tag()
    ok = not skip and start_append(relay, remote, tag, box, flags, date, size)
    while True:
        chunk = relay.home.next_event()
        if ok:
            remote.send(chunk.data)
        if chunk.last:
            break
    tail = relay.home.next_event()
    found = _UID.search(header) or _UID.search(tail.data)
    if ok:
        remote.send(b"\r\n")
        ok = relay.quiet_answer(remote, tag).kind == "OK"
    return (found.group(1).decode() if found else ""), ok


def start_append(relay, remote, tag: str, box: bytes, flags: bytes, date, size: int) -> bool:
    line = b"%s APPEND %s (%s)" % (tag.encode(), box, flags)
    if date:
        line += b' "' + date.group(1) + b'"'
    if remote.literal_plus:
        remote.send(line + b" {%d+}\r\n" % size)
        return True
    remote.send(line + b" {%d}\r\n" % size)
    return relay.quiet_continuation(remote, tag)


def relay_quote(name: str) -> bytes:
    return b'"' + name.encode("ascii").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
