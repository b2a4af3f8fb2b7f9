"""Moves and kicks reach the workers: a subscriber on ``mailgate:moves`` and ``mailgate:kick``.

Each worker runs one ``MoveListener`` (a greenlet; redis-py's sockets are cooperative after
gevent's patching).  Messages are read in batches: a full sync that moves ten thousand
mailboxes publishes ten thousand messages, and the worker scans its sessions once per batch,
not once per message.  When Redis goes away the listener reconnects with a growing delay and
never raises: a worker must outlive its Redis.  Pub/sub keeps nothing for an absent
subscriber, so after every reconnect (once every channel is confirmed) the listener calls
``recheck()``: the worker then checks its open sessions' routes against the directory and
closes those whose mailbox moved meanwhile (subscribed first, checked second: a move is either
delivered or seen by the check).  A Redis that came back empty is refilled by a full sync
without a diff (no moves): that sync publishes on ``mailgate:reload``, and the listener calls
``recheck()`` again.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import redis

from . import records

log = logging.getLogger(__name__)

MOVED_TEXT = "Mailbox moved, please reconnect"
KICKED_TEXT = "Session closed by an administrator, please reconnect"
LISTEN_TIMEOUT = 5.0      # seconds one wait for a message lasts (then the loop looks again)
MAX_BATCH = 10_000
CHANNELS = (records.MOVES_CHANNEL, records.KICK_CHANNEL, records.RELOAD_CHANNEL)
MIN_BACKOFF, MAX_BACKOFF = 0.5, 10.0


class Targets:
    """The sessions one batch of messages closes: by login name and by mailbox id."""

    def __init__(self):
        self.logins: set[str] = set()
        self.mailbox_ids: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.logins or self.mailbox_ids)

    def add(self, login: str, mailbox_id: str) -> None:
        self.logins.add(login)
        if mailbox_id:
            self.mailbox_ids.add(mailbox_id)

    def matches(self, login: str, mailbox_id: str) -> bool:
        return login in self.logins or bool(mailbox_id and mailbox_id in self.mailbox_ids)


class MoveListener:
    """Calls ``close(targets, text)`` for every batch of moves and for every batch of kicks.

    ``run()`` loops until ``stop()``; it catches every error (logging it) so that the worker
    carries on without moves rather than dying.
    """

    def __init__(self, connect: Callable[[], redis.Redis],
                 close: Callable[[Targets, str], int], sleep: Callable[[float], None] = time.sleep,
                 recent=None, limits=None,
                 recheck: Callable[[], None] | None = None):
        self.connect = connect     # a new subscriber client (no read timeout) per attempt
        self.close = close
        self.recent = recent       # a RecentLookups to keep exact, or None
        self.limits = limits       # a gateway.limits.Limits to tell of failed logins, or None
        self.sleep = sleep
        self.recheck = recheck     # the worker's re-check of its sessions' routes, or None
        self.stopped = False
        self.connected = False     # subscribed right now (tests and health checks)
        self.subscriptions = 0     # complete subscribes so far (the first is no reconnect)

    def stop(self) -> None:
        self.stopped = True

    def run(self) -> None:
        backoff = MIN_BACKOFF
        while not self.stopped:
            # A new client each time: through Sentinel it asks for the current primary.
            client = pubsub = None
            try:
                client = self.connect()
                pubsub = client.pubsub()   # the subscribe confirmations tell when nothing is missed
                pubsub.subscribe(*CHANNELS)
                self.connected = True
                if backoff > MIN_BACKOFF:
                    log.info("subscribed to moves and kicks again")
                backoff = MIN_BACKOFF
                self.listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                if self.connected or backoff == MIN_BACKOFF:
                    log.warning("moves subscription lost (%s); retrying in %.1fs", exc, backoff)
            except Exception:  # noqa: BLE001 - the worker must go on without moves
                log.exception("moves subscription failed; retrying in %.1fs", backoff)
            finally:
                self.connected = False
                if self.recent is not None:
                    self.recent.subscribed(False)
                if self.limits is not None:
                    self.limits.subscribed(False)
                _close_quietly(pubsub, client)
            if not self.stopped:
                self.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def listen(self, pubsub) -> None:
        confirmations = 0
        while not self.stopped:
            message = pubsub.get_message(timeout=LISTEN_TIMEOUT)
            if message is None:
                continue
            if message.get("type") == "subscribe":
                confirmations += 1     # every channel confirmed: no message can be missed
                if confirmations == len(CHANNELS):
                    self.subscribed()
                continue
            batch = [message]
            while len(batch) < MAX_BATCH:
                message = pubsub.get_message(timeout=0)
                if message is None:
                    break
                batch.append(message)
            self.deliver(batch)

    def subscribed(self) -> None:
        self.subscriptions += 1
        if self.recent is not None:
            self.recent.subscribed(True)
        if self.limits is not None:
            self.limits.subscribed(True)   # reads the failures counted meanwhile
        if self.subscriptions > 1 and self.recheck is not None:
            self.recheck()          # what was published while we were away is lost

    def deliver(self, batch: list[dict]) -> None:
        moves, kicks = Targets(), Targets()
        changed = reloaded = False
        for message in batch:
            if message.get("type") != "message":
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if channel == records.RELOAD_CHANNEL:
                reloaded = True
                continue
            try:
                login, mailbox_id = records.parse_close_message(message["data"])
            except ValueError as exc:
                failed = records.parse_failed_message(message["data"])
                if failed is not None:
                    if self.limits is not None:
                        self.limits.failed.mark(failed)
                elif records.is_changed_message(message["data"]):
                    changed = True
                else:
                    log.warning("ignored a message on %s: %s", channel, exc)
                continue
            (kicks if channel == records.KICK_CHANNEL else moves).add(login, mailbox_id)
        if self.recent is not None and (changed or moves):
            # before the sessions close: their clients reconnect and must look up afresh
            self.recent.forget(*((None, None) if changed else (moves.logins, moves.mailbox_ids)))
        if reloaded:
            if self.recent is not None:
                self.recent.forget(None, None)
            if self.recheck is not None:
                self.recheck()
        for targets, text in ((moves, MOVED_TEXT), (kicks, KICKED_TEXT)):
            if targets:
                closed = self.close(targets, text)
                log.info("%s: closed %d sessions (%d login names, %d mailboxes)", text,
                         closed, len(targets.logins), len(targets.mailbox_ids))


def _close_quietly(pubsub, client) -> None:
    for thing in (pubsub, client):
        if thing is None:
            continue
        try:
            thing.close()
        except Exception:  # noqa: BLE001 - the connection is broken anyway
            pass
