"""Redis key names and the msgpack mailbox record: the one place that knows the layout.

Layout (one Redis database, shared by every gateway host and sync job)::

    mailgate:dir:current      string  live generation number N
    mailgate:dir:next         string  INCR counter that hands out generation numbers
    mailgate:dir:gen:<N>      hash    normalized login name → packed MailboxRecord
    mailgate:dir:ids:<N>      hash    mailbox id → its login names, "\n"-joined (LDAP syncs:
                                      an incremental sync finds a mailbox's old names there)
    mailgate:dir:meta         hash    the last full sync: source, generation, time, counts
    mailgate:dir:lock         string  held by the running full sync (token, with a TTL)
    mailgate:dir:ldap         hash    the LDAP high-water mark of the live generation
    mailgate:dir:neg:<login>  string  negative answer of a read-through lookup (with a TTL)
    mailgate:moves            channel msgpack {"login", "from", "to", "id"} per moved login name
    mailgate:kick             channel msgpack {"login", "id"}: close these sessions by hand
    mailgate:lim:...          connection counts and failed logins (gateway/limits.py)

Workers close the sessions of a login name, or of a mailbox id, published on either channel.

A full sync writes a whole new generation hash and then switches the pointer with one SET, so a
reader sees either the old or the new directory, never a half-written one.  A lookup is one
EVALSHA: the script reads the pointer and the field in the same call (one round trip, and
atomic, so the pointer cannot move between the two reads).

Records stored in a generation hash leave ``generation`` out: the generation is the hash the
record lives in, and leaving it out keeps the bytes of an unchanged mailbox identical from one
generation to the next, which lets the sync diff compare bytes before decoding anything.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import msgpack

KEY_PREFIX = "mailgate:"
CURRENT_KEY = KEY_PREFIX + "dir:current"
NEXT_GENERATION_KEY = KEY_PREFIX + "dir:next"
META_KEY = KEY_PREFIX + "dir:meta"
SYNC_LOCK_KEY = KEY_PREFIX + "dir:lock"
GENERATION_KEY_PREFIX = KEY_PREFIX + "dir:gen:"
MAILBOX_IDS_KEY_PREFIX = KEY_PREFIX + "dir:ids:"
LDAP_MARK_KEY = KEY_PREFIX + "dir:ldap"
NEGATIVE_KEY_PREFIX = KEY_PREFIX + "dir:neg:"
MOVES_CHANNEL = KEY_PREFIX + "moves"
KICK_CHANNEL = KEY_PREFIX + "kick"
# A full sync into an empty cache (a Redis that came back empty) has no old generation to
# diff, so it publishes no moves: it says "reloaded" instead and workers re-check their
# open sessions' routes.
RELOAD_CHANNEL = KEY_PREFIX + "reload"

MAX_LOGIN_LENGTH = 255

# KEYS[1] = pointer key; ARGV[1] = generation key prefix, ARGV[2] = normalized login name,
# ARGV[3] = negative-answer key prefix.  Returns {generation or nil, packed record or nil,
# 1 if a read-through "no such user" is cached}: nil generation = the cache was never filled.
# The hash and negative key names are built inside the script, which a Redis Cluster would
# refuse (undeclared keys): the directory lives on one Redis.
LOOKUP_SCRIPT = """
local generation = redis.call('GET', KEYS[1])
if generation then
    local record = redis.call('HGET', ARGV[1] .. generation, ARGV[2])
    if record then
        return {generation, record}
    end
end
return {generation, false, redis.call('EXISTS', ARGV[3] .. ARGV[2])}
"""

# KEYS[1] = pointer key; ARGV[1] = generation key prefix, ARGV[2] = the generation the answer
# was read for, ARGV[3] = login name, ARGV[4] = packed record.  A read-through answer joins
# the generation it missed in, only if that one is still live and a sync has not meanwhile
# written the name (HSETNX): a sync's answer is never overwritten.  Returns 1 if stored.
STORE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
    return 0
end
return redis.call('HSETNX', ARGV[1] .. ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS[1] = old generation hash, KEYS[2] = new one; ARGV[1] = HSCAN cursor, ARGV[2] = COUNT.
# Compares one HSCAN batch server-side, so a million unchanged records never cross the wire.
# Returns {next cursor, names in both, names removed, names changed, moves} where changed means
# another back-end or back-end login, and moves is a flat list login, old back-end, new
# back-end, mailbox id ('' when the record has none).
# Unchanged records are byte-identical (no generation in stored records): decode only the rest.
DIFF_SCRIPT = """
local scan = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local entries = scan[2]
local common, removed, changed = 0, 0, 0
local moves = {}
for i = 1, #entries, 2 do
    local login, old = entries[i], entries[i + 1]
    local new = redis.call('HGET', KEYS[2], login)
    if not new then
        removed = removed + 1
    else
        common = common + 1
        if new ~= old then
            local old_ok, o = pcall(cmsgpack.unpack, old)
            local n = cmsgpack.unpack(new)
            if not old_ok or type(o) ~= 'table' then
                changed = changed + 1
            else
                if o['b'] ~= n['b'] or (o['l'] or '') ~= (n['l'] or '') then
                    changed = changed + 1
                end
                if o['b'] ~= n['b'] and type(o['b']) == 'string' then
                    moves[#moves + 1] = login
                    moves[#moves + 1] = o['b']
                    moves[#moves + 1] = n['b']
                    moves[#moves + 1] = n['i'] or ''
                end
            end
        end
    end
end
return {scan[1], common, removed, changed, moves}
"""

# KEYS[1] = lock key; ARGV[1] = the holder's token.  Delete only a lock we still hold.
RELEASE_LOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def generation_key(generation: int | str) -> str:
    """The hash holding generation ``generation`` of the directory."""
    return f"{GENERATION_KEY_PREFIX}{int(generation)}"


def mailbox_ids_key(generation: int | str) -> str:
    """The hash of generation ``generation`` mapping mailbox ids to their login names."""
    return f"{MAILBOX_IDS_KEY_PREFIX}{int(generation)}"


def negative_key(login_name: str) -> str:
    """The negative-answer cache key of a normalized login name (read-through misses)."""
    return NEGATIVE_KEY_PREFIX + login_name


class Move(NamedTuple):
    login: str
    from_backend: str
    to_backend: str
    mailbox_id: str = ""


def move_message(login_name: str, from_backend: str, to_backend: str,
                 mailbox_id: str = "") -> bytes:
    """The payload published on MOVES_CHANNEL when a login name changes back-end."""
    fields = {"login": login_name, "from": from_backend, "to": to_backend}
    if mailbox_id:
        fields["id"] = mailbox_id
    return msgpack.packb(fields)


def kick_message(login_name: str, mailbox_id: str = "") -> bytes:
    """The payload published on KICK_CHANNEL by ``python -m gateway kick``."""
    fields = {"login": login_name}
    if mailbox_id:
        fields["id"] = mailbox_id
    return msgpack.packb(fields)


def changed_message(generation: int) -> bytes:
    """The payload published on MOVES_CHANNEL when the directory changed in a way a move
    message does not name (a generation switch, an incremental sync): workers forget
    every lookup they keep (gateway.directory.cache.RecentLookups)."""
    return msgpack.packb({"changed": generation})


def failed_message(address: str) -> bytes:
    """The payload published on MOVES_CHANNEL when a login from ``address`` failed: every
    worker checks that address's failures in Redis for a while (gateway.limits.FailedAddresses)."""
    return msgpack.packb({"failed": address})


def parse_failed_message(data: bytes) -> str | None:
    """The client address of a ``failed_message`` payload, or None for any other payload."""
    try:
        address = _unpack_map(data, "message").get("failed")
    except ValueError:
        return None
    return address if isinstance(address, str) and address else None


def is_changed_message(data: bytes) -> bool:
    try:
        return "changed" in _unpack_map(data, "message")
    except ValueError:
        return False


def parse_move_message(data: bytes) -> Move:
    """The Move of a MOVES_CHANNEL payload; ValueError on anything else."""
    fields = _unpack_map(data, "message")
    move = Move(fields.get("login"), fields.get("from"), fields.get("to"), fields.get("id", ""))
    if not all(isinstance(value, str) for value in move):
        raise ValueError("move message field is missing or not a string")
    return move


def parse_close_message(data: bytes) -> tuple[str, str]:
    """(login name, mailbox id or "") of a MOVES_CHANNEL or KICK_CHANNEL payload: the
    sessions to close.  ValueError on anything else."""
    fields = _unpack_map(data, "message")
    login, mailbox_id = fields.get("login"), fields.get("id", "")
    if not isinstance(login, str) or not isinstance(mailbox_id, str) or not login:
        raise ValueError("message has no login name")
    return login, mailbox_id


def _unpack_map(data: bytes, what: str) -> dict:
    """A msgpack map, or ValueError naming ``what`` could not be read."""
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ...
        raise ValueError(f"undecodable {what}: {exc.__class__.__name__}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{what} is not a map")
    return fields


def normalize_login(login: str, default_domain: str = "") -> str:
    """The directory's form of a login name: stripped, lower-cased, with a domain.

    ``user`` becomes ``user@default_domain`` when a default domain is set; ``DOMAIN\\user``
    (a down-level Windows logon name) is only lower-cased.  Raises ValueError for an empty
    name, a name containing control characters, or one longer than 255 characters.
    """
    name = login.strip().lower()
    if not name:
        raise ValueError("empty login name")
    if default_domain and "@" not in name and "\\" not in name:
        name = f"{name}@{default_domain.strip().lower()}"
    if _CONTROL.search(name):
        raise ValueError("login name contains control characters")
    if len(name) > MAX_LOGIN_LENGTH:
        raise ValueError(f"login name longer than {MAX_LOGIN_LENGTH} characters")
    return name


@dataclass(frozen=True, slots=True)
class MailboxRecord:
    """Where one mailbox lives: the [backends.NAME] key and the login to replay there.

    ``backend_login`` empty means "the client's login name"; ``source`` is the sync that wrote
    the record ("export", "ldap"); ``generation`` is filled in by lookups, never stored.
    """

    backend: str
    backend_login: str = ""
    mailbox_id: str = ""
    source: str = ""
    generation: int = 0

    def pack(self) -> bytes:
        """msgpack map with one-letter keys; empty fields are left out."""
        return pack_record(self.backend, self.backend_login, self.mailbox_id, self.source,
                           self.generation)

    @classmethod
    def unpack(cls, data: bytes, generation: int | None = None) -> "MailboxRecord":
        """Decode ``pack()`` output; ValueError on anything else.  Unknown keys are ignored
        so that a newer sync job can add fields without breaking older workers."""
        fields = _unpack_map(data, "mailbox record")
        backend = fields.get("b")
        if not isinstance(backend, str) or not backend:
            raise ValueError("mailbox record has no back-end")
        values = [fields.get(key, "") for key in ("l", "i", "s")]
        if not all(isinstance(value, str) for value in values):
            raise ValueError("mailbox record field is not a string")
        stored_generation = fields.get("g", 0)
        if type(stored_generation) is not int or stored_generation < 0:
            raise ValueError("mailbox record generation is not a number")
        if generation is not None:
            stored_generation = generation
        return cls(backend, *values, stored_generation)


def pack_record(backend: str, backend_login: str = "", mailbox_id: str = "", source: str = "",
                generation: int = 0, _packb=msgpack.packb) -> bytes:
    """``MailboxRecord(...).pack()`` without building the dataclass (the sync's hot loop).

    msgpack.packb, not a shared Packer: a Packer is not thread-safe.
    """
    fields = {"b": backend}
    if backend_login:
        fields["l"] = backend_login
    if mailbox_id:
        fields["i"] = mailbox_id
    if source:
        fields["s"] = source
    if generation:
        fields["g"] = generation
    return _packb(fields)
