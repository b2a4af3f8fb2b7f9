"""Mailbox lookups against the Redis directory cache (read-only; the sync jobs write it)."""
from __future__ import annotations

import logging
import os

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import Config, DirectoryConfig
from . import records
from .records import MailboxRecord

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL = 30  # seconds idle before a pooled connection is PINGed on reuse


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


def connect(config: Config) -> redis.Redis:
    """A client (with its own pool) for the directory cache; makes no connection yet.

    Every read is bounded by ``[redis] timeout``.  One immediate retry on a connection error
    covers a pooled connection that the server closed; a timeout is not retried, so a lookup
    never waits longer than twice the timeout.
    """
    return redis.Redis.from_url(
        redis_url(config),
        socket_timeout=config.redis.timeout,
        socket_connect_timeout=config.redis.timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        retry_on_timeout=False,
    )


class Directory:
    """Answers "which back-end holds this mailbox" from the live generation in Redis.

    ``redis_client`` must return bytes (``decode_responses=False``, as ``connect`` makes it):
    records are binary msgpack.
    """

    def __init__(self, redis_client: redis.Redis, config: DirectoryConfig):
        self.redis = redis_client
        self.config = config
        self._lookup_script = redis_client.register_script(records.LOOKUP_SCRIPT)

    def lookup(self, login_name: str) -> MailboxRecord | None:
        """The mailbox record of a login name, or None for an unknown user.

        Exactly one Redis round trip (EVALSHA; the script text is sent once per server).
        A login name that cannot be normalized is unknown.  Raises DirectoryUnavailable when
        Redis fails or times out, or when no sync has filled the cache yet.  An unparsable
        record is logged and treated as unknown.
        """
        try:
            normalized = records.normalize_login(login_name, self.config.default_domain)
        except ValueError:
            return None
        try:
            answer = self._lookup_script(
                keys=[records.CURRENT_KEY],
                args=[records.GENERATION_KEY_PREFIX, normalized])
        except (redis.RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"directory cache: {exc.__class__.__name__}: {exc}") \
                from exc
        if answer is None:
            raise DirectoryUnavailable("directory cache is empty: no sync has completed")
        generation, packed = int(answer[0]), answer[1]
        if packed is None:
            return None
        try:
            return MailboxRecord.unpack(packed, generation=generation)
        except ValueError as exc:
            log.warning("directory record for %r in generation %d is unusable: %s",
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
