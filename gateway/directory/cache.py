"""Mailbox lookups against the Redis directory cache (read-only; the sync jobs write it)."""
from __future__ import annotations

import logging
import os
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import Config, DirectoryConfig
from ..metrics import recorder
from . import records
from .records import MailboxRecord

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL = 30  # seconds idle before a pooled connection is PINGed on reuse
RECENT_TTL = 30.0           # seconds a worker reuses a lookup (a safety net: see RecentLookups)
RECENT_SIZE = 10_000        # answers kept per worker (~2 MB); a full cache starts over


class DirectoryUnavailable(Exception):
    """The directory cannot answer now (Redis down, timed out, never filled): a temporary
    failure for the client, never "unknown user"."""


def redis_url(config: Config) -> str:
    """``[redis] url``, or the embedded server's socket under ``[server] run_dir``.

    The master starts the private redis-server on ``<run_dir>/redis.sock``; workers and the CLI
    tools find it the same way, relative to the working directory.
    """
    if config.redis.url:
        return config.redis.url
    return "unix://" + os.path.join(os.path.abspath(config.server.run_dir), "redis.sock")


def connect(config: Config, url: str = "", subscriber: bool = False) -> redis.Redis:
    """A client (with its own pool) for the directory cache; makes no connection yet.

    Every read is bounded by ``[redis] timeout`` (a ``subscriber`` waits for messages without
    a read timeout and keeps its TCP connection alive instead).  One immediate retry on a
    connection error covers a pooled connection that the server closed; a timeout is not
    retried, so a lookup never waits longer than twice the timeout.  With ``[redis]
    sentinels`` the client asks the Sentinels for the current primary on every new
    connection, so after a failover the next connection goes to the promoted replica.
    ``url`` overrides the configured one (the master hands the embedded server's to workers).
    """
    settings = config.redis
    options = dict(
        socket_timeout=None if subscriber else settings.timeout,
        socket_connect_timeout=settings.timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        retry_on_timeout=False,
    )
    if settings.sentinels:
        from redis.sentinel import Sentinel
        from ..config import split_address
        sentinel = Sentinel(
            [split_address(address) for address in settings.sentinels],
            sentinel_kwargs={"socket_timeout": settings.timeout,
                             "socket_connect_timeout": settings.timeout,
                             "password": settings.sentinel_password or None},
            password=settings.password or None, db=settings.db, **options)
        return sentinel.master_for(settings.service_name)
    target = url or redis_url(config)
    if subscriber and not target.startswith("unix:"):
        options["socket_keepalive"] = True   # (a unix socket has no keepalive option)
    return redis.Redis.from_url(target, **options)


def describe(config: Config) -> str:
    """Where the directory cache is, for messages: the URL or the Sentinel service."""
    if config.redis.sentinels:
        return f"sentinel service {config.redis.service_name} via " + ",".join(
            config.redis.sentinels)
    return redis_url(config)


class RecentLookups:
    """A worker's recent answers (login name → MailboxRecord), so that a client opening
    several connections, or reconnecting, costs no Redis round trip.

    Only found records are kept, and only while the worker is subscribed to the moves
    channel (``subscribed(True)``): every move, every generation switch (full sync) and every
    incremental sync is published there and ``forget`` drops what it names before the
    sessions are closed, so a move takes effect at once.  While unsubscribed (Redis lost)
    nothing is kept, since a message could be missed.  A lookup that was in flight when
    ``forget`` ran must not store what it read before the change: ``epoch`` counts the
    invalidations, and ``put`` only stores an answer whose lookup began in the current one.
    """

    def __init__(self, ttl: float = RECENT_TTL, size: int = RECENT_SIZE, clock=time.monotonic):
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self.entries: dict[str, tuple[float, MailboxRecord]] = {}
        self.epoch = 0
        self.enabled = False

    def get(self, normalized: str) -> MailboxRecord | None:
        entry = self.entries.get(normalized)
        if entry is None:
            return None
        if entry[0] < self.clock():
            del self.entries[normalized]
            return None
        return entry[1]

    def put(self, normalized: str, record: MailboxRecord, epoch: int) -> None:
        """Keep ``record``, read from Redis by a lookup that began in ``epoch``."""
        if not self.enabled or epoch != self.epoch:
            return
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[normalized] = (self.clock() + self.ttl, record)

    def forget(self, logins=None, mailbox_ids=None) -> None:
        """Drop these login names and mailboxes; everything when both are None."""
        self.epoch += 1
        if logins is None and mailbox_ids is None:
            self.entries.clear()
            return
        for login in logins or ():
            self.entries.pop(login, None)
        if mailbox_ids:
            for name in [n for n, (_, r) in self.entries.items() if r.mailbox_id in mailbox_ids]:
                del self.entries[name]

    def subscribed(self, connected: bool) -> None:
        """The moves subscription is up (keep answers) or down (keep nothing)."""
        self.forget()
        self.enabled = connected


class Directory:
    """Answers "which back-end holds this mailbox" from the live generation in Redis.

    ``redis_client`` must return bytes (``decode_responses=False``, as ``connect`` makes it):
    records are binary msgpack.  ``resolver`` (read-through, ``LdapResolver``) answers the
    misses: its ``find(login_name)`` returns a MailboxRecord or None, or raises an exception
    when the directory server cannot answer.
    """

    def __init__(self, redis_client: redis.Redis, config: DirectoryConfig, resolver=None,
                 recent: RecentLookups | None = None):
        self.redis = redis_client
        self.recent = recent
        self.config = config
        self.resolver = resolver
        self._lookup_script = redis_client.register_script(records.LOOKUP_SCRIPT)
        self._store_script = redis_client.register_script(records.STORE_SCRIPT)

    @classmethod
    def for_config(cls, redis_client: redis.Redis, config: Config) -> "Directory":
        """The Directory a worker uses: read-through to LDAP when ``miss = "read-through"``."""
        resolver = None
        if config.directory.read_through:
            from .ldap import LdapResolver   # ldap3 only where read-through is configured
            resolver = LdapResolver(config)
        return cls(redis_client, config.directory, resolver)

    def lookup(self, login_name: str) -> MailboxRecord | None:
        """The mailbox record of a login name, or None for an unknown user.

        A hit is exactly one Redis round trip (EVALSHA; the script text is sent once per
        server).  A login name that cannot be normalized is unknown.  Without a resolver,
        raises DirectoryUnavailable when Redis fails or times out, or when no sync has
        filled the cache yet.  With one, a miss that is not cached as negative asks the
        directory server (``read_through``).  An unparsable record is logged and unknown.
        """
        try:
            normalized = records.normalize_login(login_name, self.config.default_domain)
        except ValueError:
            return None
        return self.lookup_normalized(normalized)

    def lookup_normalized(self, normalized: str, admission=None) -> MailboxRecord | None:
        """``lookup`` for a name ``normalize_login`` already returned (the login path).

        ``admission`` (gateway.limits.Admission) runs the lookup inside its own script, in
        the same round trip; when it refuses the login (``status`` not "ok") this returns
        None without asking anyone else.  Without one, or when the limits need not see this
        login (``Limits.round_trip``: no counting, an address without failures), a recent
        answer (``recent``) is reused with no round trip at all.
        """
        recent = self.recent
        if admission is not None:
            admission.login = normalized
            if admission.limits.round_trip(admission):
                return self._lookup_redis(normalized, admission)
        if recent is None:
            return self._lookup_redis(normalized, None)
        record = recent.get(normalized)
        if record is None:
            epoch = recent.epoch
            record = self._lookup_redis(normalized, None)
            if record is not None:
                recent.put(normalized, record, epoch)
        return record

    def _lookup_redis(self, normalized: str, admission) -> MailboxRecord | None:
        started = time.perf_counter()
        keys = [records.CURRENT_KEY]
        args = [records.GENERATION_KEY_PREFIX, normalized, records.NEGATIVE_KEY_PREFIX]
        try:
            if admission is None:
                answer = self._lookup_script(keys=keys, args=args)
            else:
                answer = admission.run(keys, args)
        except (redis.RedisError, OSError) as exc:
            recorder.lookup("error", time.perf_counter() - started)
            raise DirectoryUnavailable(f"directory cache: {exc.__class__.__name__}: {exc}") \
                from exc
        recorder.lookup("hit" if answer[1] is not None else "miss",
                        time.perf_counter() - started)
        if admission is not None and admission.status != "ok":
            return None
        generation = int(answer[0]) if answer[0] is not None else None
        packed = answer[1]
        if packed is not None:
            return self._unpack(normalized, packed, generation)
        if self.resolver is None:
            if generation is None:
                raise DirectoryUnavailable("directory cache is empty: no sync has completed")
            return None
        if answer[2]:
            return None          # a recent read-through said "no such user"
        return self.read_through(normalized, generation)

    def read_through(self, normalized: str, generation: int | None) -> MailboxRecord | None:
        """Ask the resolver for one login name and cache its answer: a record joins the live
        generation it missed in, "no such user" is kept ``negative_ttl`` seconds.  Raises
        DirectoryUnavailable when the directory server cannot answer."""
        started = time.perf_counter()
        try:
            record = self.resolver.find(normalized)
            recorder.lookup("read-through", time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - LdapError, timeouts: all mean "try later"
            log.warning("read-through lookup of %r failed: %s", normalized, exc)
            raise DirectoryUnavailable(f"directory server: {exc}") from exc
        try:
            if record is None:
                if self.config.negative_ttl:
                    self.redis.set(records.negative_key(normalized), b"1",
                                   ex=self.config.negative_ttl)
            elif generation is not None:
                self._store_script(keys=[records.CURRENT_KEY],
                                   args=[records.GENERATION_KEY_PREFIX, generation, normalized,
                                         record.pack()])
        except (redis.RedisError, OSError) as exc:
            log.warning("read-through answer for %r not cached: %s", normalized, exc)
        if record is not None and generation is not None:
            record = MailboxRecord(record.backend, record.backend_login, record.mailbox_id,
                                   record.source, generation)
        return record

    def _unpack(self, normalized: str, packed: bytes, generation: int | None):
        try:
            return MailboxRecord.unpack(packed, generation=generation)
        except ValueError as exc:
            log.warning("directory record for %r in generation %s is unusable: %s",
                        normalized, generation, exc)
            return None

    def live_generation(self) -> int | None:
        """The live generation number, or None before the first sync (a second round trip:
        for tools and health checks, not for logins)."""
        try:
            value = self.redis.get(records.CURRENT_KEY)
        except (redis.RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"directory cache: {exc.__class__.__name__}: {exc}") \
                from exc
        return int(value) if value is not None else None
