"""Full sync: write a new generation of the directory cache, switch to it, publish the moves.

Steps (see records.py for the keys)::

    lock    SET mailgate:dir:lock NX (one full sync at a time)
    write   INCR mailgate:dir:next → N; HSET mailgate:dir:gen:N in pipelined batches
            (the half-written hash carries a TTL, so a crashed sync leaves nothing behind)
    switch  MULTI: PERSIST gen:N, SET mailgate:dir:current N, EXPIRE the old hash, write or
            drop the LDAP high-water mark, EXEC
    diff    HSCAN the old hash, HMGET the same names in the new one: added/changed/removed;
            a changed back-end is PUBLISHed on mailgate:moves so workers close the sessions
    clean   UNLINK the old hash; HSET mailgate:dir:meta

Readers see the old generation until the SET and the new one after it: never a mix.  If the
entries raise (a bad export line), the new hash is deleted and the live generation is untouched.
"""
from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, TextIO

import redis
from hiredis import pack_command

from ..config import Config
from . import records
from .export import ExportEntry

WRITE_BATCH = 2000          # login names per HSET command
WRITES_PER_ROUND_TRIP = 5   # HSET commands per pipeline
SCAN_BATCH = 1000           # HSCAN COUNT per diff script call (~1 ms of Redis time)
WRITE_TTL = 600             # seconds a half-written generation survives a crashed sync
OLD_GENERATION_TTL = 3600   # the replaced generation, should the sync die before UNLINK
LOCK_TTL = 120              # refreshed with every batch
MAX_REPORTED_LINES = 5


class SyncError(Exception):
    """The sync refused to switch generations; the live directory is unchanged."""


class SyncBusy(SyncError):
    """Another full sync holds the lock."""


class SyncNotNeeded(SyncError):
    """A conditional sync (the master's refill) found, under the lock, nothing to do."""


@dataclass
class SyncSummary:
    """What a full sync did; ``line()`` is the one line the caller prints or logs.

    Counts are login names (a mailbox with two login names counts twice).  ``warnings`` are
    for the caller to show: the sync itself neither prints nor logs them.
    """

    added: int = 0
    changed: int = 0
    removed: int = 0
    skipped: int = 0
    total: int = 0
    seconds: float = 0.0
    generation: int = 0
    label: str = "sync export"
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.label}: {self.total} mailboxes, {self.added} added, "
                f"{self.changed} changed, {self.removed} removed, {self.skipped} skipped, "
                f"generation {self.generation}, {self.seconds:.1f} s")


def full_sync(redis_client: redis.Redis, entries: Iterable[ExportEntry], *, source: str,
              config: Config, progress: TextIO | None = None, origin: str = "",
              label: str = "sync export", index_mailboxes: bool = False,
              mark: Callable[[], dict] | None = None,
              precondition: Callable[[redis.Redis], str | None] | None = None) -> SyncSummary:
    """Replace the live directory by ``entries`` and return what changed.

    ``entries`` carry normalized login names (as the export readers yield them); each
    back-end value goes through ``config.backend()`` and is stored as the [backends.NAME]
    key; an unknown back-end skips the entry (counted, first lines in ``warnings``).
    ``source`` is stored in every record (keep it short: "export", "ldap"); ``origin`` (a file
    name, an LDAP URL) only in mailgate:dir:meta.  Exceptions from ``entries`` (ExportError)
    and from Redis propagate after the half-written generation is deleted.  Raises SyncBusy
    when another sync runs, SyncError when the export has no usable entry but the live
    directory has some.  ``progress``: a terminal gets a progress line (≤ 10 updates/s).

    ``index_mailboxes``: also write mailbox id → login names (a mailbox's entries come
    together, as LDAP's do) for incremental syncs.  ``mark()``, called once the entries are
    written, gives the LDAP high-water mark stored with the switch (else it is dropped).

    ``precondition(client)``, asked once the lock is held, returns why the sync is needed or
    None, and then SyncNotNeeded is raised: the master's refill must not undo a sync that
    ran between its look at the cache and its start.
    """
    started = time.monotonic()
    bar = Progress(progress, label, started)
    summary = SyncSummary(label=label)
    with sync_lock(redis_client) as lock:
        if precondition is not None and precondition(redis_client) is None:
            raise SyncNotNeeded(f"{label}: the directory cache is up to date; nothing done")
        old_generation = live_generation(redis_client)
        summary.generation = _new_generation(redis_client, old_generation)
        new_key = records.generation_key(summary.generation)
        ids_key = records.mailbox_ids_key(summary.generation) if index_mailboxes else None
        try:
            _write_generation(redis_client, (new_key, ids_key), entries, source, config,
                              summary, bar)
            if summary.total == 0 and old_generation is not None and \
                    redis_client.hlen(records.generation_key(old_generation)):
                raise SyncError(f"{label}: no usable entries; the live directory "
                                f"(generation {old_generation}) was kept")
            high_water = mark() if mark is not None else None
        except BaseException:
            _discard(redis_client, summary.generation)
            bar.clear()
            raise
        _switch(redis_client, summary.generation, old_generation, high_water)
        if old_generation is None:
            summary.added = summary.total
            redis_client.publish(records.RELOAD_CHANNEL, str(summary.generation))
        else:
            old_key = records.generation_key(old_generation)
            _diff_and_publish(redis_client, old_key, new_key, summary, bar, lock)
            redis_client.unlink(old_key, records.mailbox_ids_key(old_generation))
        bar.clear()
        summary.seconds = time.monotonic() - started
        _record_meta(redis_client, summary, source, origin)
    return summary


def live_generation(client: redis.Redis) -> int | None:
    """The live generation number, None before the first sync."""
    value = client.get(records.CURRENT_KEY)
    return int(value) if value is not None else None


def _new_generation(client: redis.Redis, live: int | None) -> int:
    """A generation number above the live one, even if the counter was reset by hand."""
    generation = int(client.incr(records.NEXT_GENERATION_KEY))
    if live is not None and generation <= live:
        client.set(records.NEXT_GENERATION_KEY, live)
        generation = int(client.incr(records.NEXT_GENERATION_KEY))
    client.delete(records.generation_key(generation), records.mailbox_ids_key(generation))
    return generation


def _write_generation(client, keys, entries, source, config, summary, bar) -> None:
    """HSET every usable entry into ``keys[0]`` (and the mailbox index into ``keys[1]``
    unless None): few large commands, replies read one batch late so that Redis stores a
    batch while this process reads the next one."""
    key, ids_key = keys
    backend_names: dict[str, str | None] = {}   # export value → [backends.NAME] or None
    skipped = _Skipped()
    pack = records.pack_record
    pairs: list = []
    batches = 0
    index = _MailboxIndex(ids_key)
    with _GenerationWriter(client, key) as writer:
        for entry in entries:
            try:
                backend = backend_names[entry.backend]
            except KeyError:
                found = config.backend(entry.backend)
                backend = backend_names[entry.backend] = found.name if found else None
            if backend is None:
                skipped.add(entry)
                continue
            pairs += (entry.login, pack(backend, entry.backend_login, entry.mailbox_id, source))
            if ids_key:
                index.add(entry.mailbox_id, entry.login)
            if len(pairs) >= 2 * WRITE_BATCH:
                writer.hset(pairs)
                index.write(writer)
                summary.total += len(pairs) // 2
                pairs = []
                batches += 1
                if batches % WRITES_PER_ROUND_TRIP == 0:
                    writer.flush()
                    bar.update("writing", summary.total)
        if pairs:
            writer.hset(pairs)
            summary.total += len(pairs) // 2
        index.write(writer, final=True)
        writer.flush()
        writer.wait()
    bar.update("writing", summary.total)
    summary.skipped = skipped.count
    if skipped.count:
        summary.warnings.append(skipped.warning())


class _Skipped:
    """Entries whose back-end is not configured: counted, the first few named."""

    def __init__(self):
        self.count = 0
        self.places: list = []            # line numbers (files) or DNs (LDAP)
        self.backends: dict[str, None] = {}

    def add(self, entry: ExportEntry) -> None:
        self.count += 1
        if len(self.places) < MAX_REPORTED_LINES:
            self.places.append(entry.where or entry.line)
            self.backends[entry.backend] = None

    def warning(self) -> str:
        more = ", ..." if self.count > len(self.places) else ""
        where = (f"on lines {', '.join(map(str, self.places))}"
                 if all(isinstance(p, int) for p in self.places)
                 else f"in {'; '.join(map(str, self.places))}")
        return (f"{self.count} entries name no configured back-end "
                f"({', '.join(map(repr, self.backends))}{more}) {where}{more}; skipped")


class _MailboxIndex:
    """Collects mailbox id → login names for the index hash (consecutive entries of one id
    are one mailbox); ``write`` queues the finished mailboxes on the generation writer."""

    def __init__(self, key: str | None):
        self.key = key.encode() if key else None
        self.pairs: list = []
        self.mailbox_id = ""
        self.names: list[str] = []

    def add(self, mailbox_id: str, login: str) -> None:
        if mailbox_id != self.mailbox_id:
            self.close_mailbox()
            self.mailbox_id = mailbox_id
        self.names.append(login)

    def close_mailbox(self) -> None:
        if self.mailbox_id and self.names:
            self.pairs += (self.mailbox_id, "\n".join(self.names))
        self.names = []

    def write(self, writer: "_GenerationWriter", final: bool = False) -> None:
        if self.key is None:
            return
        if final:
            self.close_mailbox()
        if self.pairs:
            writer.hset(self.pairs, self.key)
            self.pairs = []


class _GenerationWriter:
    """Streams HSET commands for one hash on one connection of the client's pool.

    The commands are packed by hiredis (``pack_command``, C: ~0.27 µs per pair; redis-py's
    pipeline adds a Python pass over every argument) and each flush reads the replies of the
    previous flush only, keeping one batch in flight, which a redis-py pipeline cannot (its
    ``execute`` waits for every reply: the 1,000,000-mailbox warm-up took 25-30 % longer).
    Every flush also refreshes the hash's TTL and the sync lock.
    """

    def __init__(self, client: redis.Redis, key: str):
        self.pool = client.connection_pool
        self.key = key.encode()
        self.connection = None
        self.queued: list[bytes] = []
        self.queued_commands = 0
        self.in_flight = 0
        self.other_keys: list[bytes] = []

    def __enter__(self) -> "_GenerationWriter":
        self.connection = self.pool.get_connection()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.connection.disconnect()  # unread replies: the connection is unusable
        self.pool.release(self.connection)

    def hset(self, pairs: list, key: bytes | None = None) -> None:
        self.queued.append(pack_command((b"HSET", key or self.key, *pairs)))
        self.queued_commands += 1
        if key and key not in self.other_keys:
            self.other_keys.append(key)

    def flush(self) -> None:
        for command in [("EXPIRE", key, WRITE_TTL) for key in (self.key, *self.other_keys)] + \
                [("EXPIRE", records.SYNC_LOCK_KEY, LOCK_TTL)]:
            self.queued.append(pack_command(command))
            self.queued_commands += 1
        self.connection.send_packed_command(self.queued)
        self.wait()
        self.in_flight, self.queued, self.queued_commands = self.queued_commands, [], 0

    def wait(self) -> None:
        """Read the replies of the commands in flight (a Redis error reply raises)."""
        for _ in range(self.in_flight):
            self.connection.read_response()
        self.in_flight = 0


def _discard(client: redis.Redis, generation: int) -> None:
    """Best effort: the TTL removes the hashes anyway if Redis is gone."""
    try:
        client.unlink(records.generation_key(generation), records.mailbox_ids_key(generation))
    except redis.RedisError:
        pass


def _switch(client: redis.Redis, generation: int, old_generation: int | None,
            high_water: dict | None) -> None:
    """Make ``generation`` live in one transaction (readers see old or new, nothing else)."""
    pipe = client.pipeline(transaction=True)
    pipe.persist(records.generation_key(generation))
    pipe.persist(records.mailbox_ids_key(generation))
    pipe.set(records.CURRENT_KEY, generation)
    if old_generation is not None:
        pipe.expire(records.generation_key(old_generation), OLD_GENERATION_TTL)
        pipe.expire(records.mailbox_ids_key(old_generation), OLD_GENERATION_TTL)
    pipe.delete(records.LDAP_MARK_KEY)
    if high_water:
        pipe.hset(records.LDAP_MARK_KEY, mapping={**high_water, "generation": generation})
    pipe.publish(records.MOVES_CHANNEL, records.changed_message(generation))
    pipe.execute()


def _diff_and_publish(client, old_key, new_key, summary, bar, lock) -> None:
    """Count added/changed/removed against the old hash; PUBLISH a move per changed back-end.

    The comparison runs in Redis (records.DIFF_SCRIPT), one HSCAN batch per call, so each
    call blocks readers for a millisecond or so and only the moves come back.  HSCAN could
    return a name twice if the old hash were rehashed meanwhile; nothing writes to it any
    more, so the counts are exact in practice (at worst a move is published twice).
    """
    diff = client.register_script(records.DIFF_SCRIPT)
    common = 0
    cursor = b"0"
    while True:
        cursor, same, removed, changed, moves = diff(keys=[old_key, new_key],
                                                     args=[cursor, SCAN_BATCH])
        common += same
        summary.removed += removed
        summary.changed += changed
        publish_moves(client, [
            records.move_message(*(field.decode() for field in moves[i:i + 4]))
            for i in range(0, len(moves), 4)], lock)
        bar.update("comparing", common + summary.removed)
        if int(cursor) == 0:
            break
    summary.added = summary.total - common


def publish_moves(client: redis.Redis, moves: list[bytes], lock) -> None:
    pipe = client.pipeline(transaction=False)
    for message in moves:
        pipe.publish(records.MOVES_CHANNEL, message)
    if lock is not None:
        lock.refresh(pipe)
    pipe.execute()



def _record_meta(client: redis.Redis, summary: SyncSummary, source: str, origin: str) -> None:
    client.hset(records.META_KEY, mapping={
        "source": source, "origin": origin, "generation": summary.generation,
        "time": f"{time.time():.3f}", "seconds": f"{summary.seconds:.3f}",
        "total": summary.total, "added": summary.added, "changed": summary.changed,
        "removed": summary.removed, "skipped": summary.skipped})


class _Lock:
    def __init__(self, client: redis.Redis):
        self.client = client
        self.token = secrets.token_hex(16)

    def acquire(self) -> None:
        if not self.client.set(records.SYNC_LOCK_KEY, self.token, nx=True, ex=LOCK_TTL):
            raise SyncBusy(f"another full sync is running ({records.SYNC_LOCK_KEY} is held)")

    def refresh(self, pipe) -> None:
        pipe.expire(records.SYNC_LOCK_KEY, LOCK_TTL)

    def release(self) -> None:
        try:
            self.client.eval(records.RELEASE_LOCK_SCRIPT, 1, records.SYNC_LOCK_KEY, self.token)
        except redis.RedisError:
            pass  # the TTL frees it


@contextmanager
def sync_lock(client: redis.Redis):
    """Hold mailgate:dir:lock (one sync, full or incremental, at a time); SyncBusy if held."""
    lock = _Lock(client)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


class Progress:
    """One terminal line, rewritten at most 10 times a second; silent unless a tty."""

    def __init__(self, out: TextIO | None, label: str, started: float):
        self.out = out if out is not None and _isatty(out) else None
        self.label = label
        self.started = started
        self.shown = 0.0

    def update(self, phase: str, rows: int) -> None:
        if self.out is None:
            return
        now = time.monotonic()
        if now - self.shown < 0.1:
            return
        self.shown = now
        rate = rows / max(now - self.started, 1e-6)
        self.out.write(f"\r{self.label}: {phase} {rows:,} rows, {rate:,.0f} rows/s\x1b[K")
        self.out.flush()

    def clear(self) -> None:
        if self.out is not None and self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()


def _isatty(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False

