"""The LDAP sync jobs: full (a new generation, sync.full_sync) and incremental (the changes
since the high-water mark, written into the live generation).

A full LDAP sync also writes the mailbox index (mailbox id → login names) and, in the same
transaction as the switch, the high-water mark with a fingerprint of the settings that shaped
the generation.  An incremental sync runs only on top of the generation that mark belongs to
and with the same settings; otherwise it does a full sync instead (the first scheduled run
fills the cache that way).

Incremental changes are applied in batches, each one MULTI/EXEC: a mailbox's login names
change together.  A login name is deleted only from the mailbox that still owns it, so a
name that moved to another entry is never lost.  Deletions reach an incremental sync only as
Active Directory tombstones (``uSNChanged`` with the Show Deleted control); with OpenLDAP's
``modifyTimestamp`` a deleted entry disappears at the next full sync.
"""
from __future__ import annotations

import datetime
import hashlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TextIO

import redis

from ..config import Config
from . import ldap, records
from .export import ExportEntry
from .mapping import AttributeMap, Mailbox
from .records import MailboxRecord
from .sync import Progress, SyncSummary, full_sync, live_generation, publish_moves, sync_lock

INCREMENTAL_BATCH = 500
TIMESTAMP_OVERLAP = 300     # seconds re-read before a modifyTimestamp mark (clock skew, and
                            # entries changed while the previous search ran)
SOURCE = "ldap"
MAX_REPORTED = 5


def fingerprint(config: Config) -> str:
    """What an incremental sync must share with the full sync under it."""
    d = config.directory
    settings = [d.ldap_url, d.ldap_base, d.ldap_filter, d.ldap_change_attribute.lower(),
                *d.login_attributes, d.backend_attribute, d.backend_login_attribute,
                d.id_attribute, d.default_domain, d.netbios_domain]
    return hashlib.sha256("\0".join(settings).lower().encode()).hexdigest()[:16]


def full_ldap_sync(client: redis.Redis, config: Config, progress: TextIO | None = None,
                   label: str = "sync ldap", precondition=None) -> SyncSummary:
    """Replace the live directory by the mailboxes found under ``ldap_base``.

    Raises ldap.LdapError (server unreachable, bind refused, search failed: nothing changed),
    SyncBusy, SyncError and Redis errors like sync.full_sync.
    """
    directory = config.directory
    connection = ldap.connect(directory, directory.ldap_timeout)
    duplicates = _Duplicates()
    try:
        mark = ldap.ChangeMark(directory)
        mark.read_server_usn(connection)
        items = ldap.search_mailboxes(connection, directory, AttributeMap(directory),
                                      directory.ldap_filter, mark)
        summary = full_sync(
            client, _entries(items, duplicates), source=SOURCE, config=config,
            progress=progress, origin=f"{directory.ldap_url} {directory.ldap_base}",
            label=label, index_mailboxes=True, precondition=precondition,
            mark=lambda: {"attribute": mark.attribute, "value": mark.value,
                          "fingerprint": fingerprint(config)})
    finally:
        ldap.close(connection)
    if duplicates.count:
        summary.warnings.insert(0, duplicates.warning())
    return summary


class _Duplicates:
    def __init__(self):
        self.count = 0
        self.examples: list[str] = []

    def add(self, login: str, dn: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(f"{login!r} ({dn})")

    def warning(self) -> str:
        more = ", ..." if self.count > len(self.examples) else ""
        return (f"{self.count} login names belong to more than one entry; the first entry "
                f"keeps each: {', '.join(self.examples)}{more}")


def _entries(items: Iterable, duplicates: _Duplicates) -> Iterator[ExportEntry]:
    """One ExportEntry per login name; a name an earlier entry had is left out (only the
    names' hashes are kept: a million entries fit in a few dozen MB)."""
    seen: set[int] = set()
    for number, item in enumerate(items, 1):
        if not isinstance(item, Mailbox):
            continue
        for login in item.login_names:
            login_hash = hash(login)
            if login_hash in seen:
                duplicates.add(login, item.dn)
                continue
            seen.add(login_hash)
            yield ExportEntry(number, login, item.backend, item.backend_login, item.mailbox_id,
                              item.dn)


def incremental_ldap_sync(client: redis.Redis, config: Config, progress: TextIO | None = None,
                          label: str = "sync ldap --incremental") -> SyncSummary:
    """Apply the entries changed since the high-water mark to the live generation, publish
    the moves, advance the mark.  Falls back to a full sync when the live generation has no
    usable mark (the summary's first warning says so)."""
    with sync_lock(client) as lock:
        generation = live_generation(client)
        stored = {k.decode(): v.decode() for k, v in client.hgetall(records.LDAP_MARK_KEY).items()}
        reason = _unusable(stored, generation, config)
        if reason is None:
            return _incremental(client, config, generation, stored["value"], lock, progress,
                                label)
    summary = full_ldap_sync(client, config, progress, label=label + " (full)")
    summary.warnings.insert(0, f"{reason}: did a full sync")
    return summary


def _unusable(stored: dict, generation: int | None, config: Config) -> str | None:
    if generation is None:
        return "the directory cache is empty"
    if stored.get("generation") != str(generation):
        return f"generation {generation} was not made by an LDAP sync"
    if stored.get("fingerprint") != fingerprint(config):
        return "the [directory] LDAP settings changed since the last full sync"
    if not stored.get("value"):
        return "the last full sync saw no change mark"
    return None


def _incremental(client, config, generation, mark_value, lock, progress, label) -> SyncSummary:
    directory = config.directory
    started = time.monotonic()
    summary = SyncSummary(label=label, generation=generation)
    bar = Progress(progress, label, started)
    connection = ldap.connect(directory, directory.ldap_timeout)
    try:
        mark = ldap.ChangeMark(directory, mark_value)
        mark.read_server_usn(connection)
        search_filter = ldap.and_filter(directory.ldap_filter, _changed_since(config, mark_value))
        batch: list = []
        for item in ldap.search_mailboxes(connection, directory, AttributeMap(directory),
                                          search_filter, mark, tombstones=ldap.is_usn(directory)):
            batch.append(item)
            if len(batch) >= INCREMENTAL_BATCH:
                _apply(client, generation, batch, config, summary, lock)
                batch = []
                bar.update("applying", summary.total)
        if batch:
            _apply(client, generation, batch, config, summary, lock)
    finally:
        ldap.close(connection)
        bar.clear()
    # "time": when the last incremental sync ended (status and /metrics report its age).
    client.hset(records.LDAP_MARK_KEY, mapping={"value": mark.value, "time": f"{time.time():.3f}"})
    summary.seconds = time.monotonic() - started
    return summary


def _changed_since(config: Config, mark_value: str) -> str:
    attribute = config.directory.ldap_change_attribute
    if ldap.is_usn(config.directory):
        return f"({attribute}>={int(mark_value) + 1})"
    try:
        moment = datetime.datetime.strptime(mark_value[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return f"({attribute}>={mark_value})"
    moment -= datetime.timedelta(seconds=TIMESTAMP_OVERLAP)
    return f"({attribute}>={moment:%Y%m%d%H%M%S}Z)"


@dataclass
class _MailboxChange:
    mailbox_id: str
    old_names: list[str]
    new_records: dict[str, bytes] = field(default_factory=dict)   # login name → packed


def _apply(client, generation: int, batch: list, config: Config, summary: SyncSummary,
           lock) -> None:
    """Write one batch of changed entries into the live generation (one transaction) and
    publish the moves it makes."""
    gen_key = records.generation_key(generation)
    ids_key = records.mailbox_ids_key(generation)
    changes = _changes(client, ids_key, batch, config, summary)
    names = list(dict.fromkeys(n for c in changes for n in (*c.old_names, *c.new_records)))
    current = dict(zip(names, client.hmget(gen_key, names))) if names else {}
    pipe = client.pipeline(transaction=True)
    moves: list[bytes] = []
    for change in changes:
        _write_change(pipe, gen_key, change, current, summary, moves)
        if change.new_records:
            pipe.hset(ids_key, change.mailbox_id, "\n".join(change.new_records))
        else:
            pipe.hdel(ids_key, change.mailbox_id)
    if changes:     # workers forget the lookups they keep (RecentLookups), with the write
        pipe.publish(records.MOVES_CHANNEL, records.changed_message(generation))
    pipe.execute()
    if moves:
        publish_moves(client, moves, lock)


def _changes(client, ids_key: str, batch: list, config: Config,
             summary: SyncSummary) -> list[_MailboxChange]:
    ids = [item.mailbox_id for item in batch]
    old = client.hmget(ids_key, ids)
    changes = []
    for item, old_names in zip(batch, old):
        change = _MailboxChange(item.mailbox_id, old_names.decode().split("\n") if old_names else [])
        if isinstance(item, Mailbox):
            backend = config.backend(item.backend)
            if backend is None:
                summary.skipped += len(item.login_names)
                summary.warnings.append(f"{item.dn}: back-end {item.backend!r} is not "
                                        "configured; its login names are removed")
            else:
                change.new_records = {name: records.pack_record(
                    backend.name, item.backend_login, item.mailbox_id, SOURCE)
                    for name in item.login_names}
                summary.total += len(item.login_names)
        changes.append(change)
    return changes


def _write_change(pipe, gen_key, change: _MailboxChange, current: dict, summary, moves) -> None:
    for name in change.old_names:
        if name not in change.new_records and current.get(name) is not None and \
                _record(current[name]).mailbox_id == change.mailbox_id:
            pipe.hdel(gen_key, name)
            summary.removed += 1
    for name, packed in change.new_records.items():
        old = current.get(name)
        if old == packed:
            continue
        pipe.hset(gen_key, name, packed)
        if old is None:
            summary.added += 1
            continue
        before, after = _record(old), _record(packed)
        if (before.backend, before.backend_login) != (after.backend, after.backend_login):
            summary.changed += 1
        if before.backend != after.backend:
            moves.append(records.move_message(name, before.backend, after.backend,
                                              change.mailbox_id))


def _record(packed: bytes) -> MailboxRecord:
    try:
        return MailboxRecord.unpack(packed)
    except ValueError:
        return MailboxRecord("?")
