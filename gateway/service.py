"""What a worker serves: one handler per listener, the shared lookup, the open sessions, and
the subscriber that closes the sessions of moved (or kicked) mailboxes.

The worker process (workers/worker.py) builds one ``Service`` after fork and hands each
accepted connection to ``Service.handler(listen)``.  Everything here runs under gevent.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import time

log = logging.getLogger("mailgate.service")


class Service:
    """Per-worker state shared by all sessions: config, directory, session registry."""

    def __init__(self, config, redis_url: str):
        from gateway.directory import cache
        self.config = config
        self.redis_url = redis_url
        self.redis = cache.connect(config, redis_url)
        self.directory = cache.Directory.for_config(self.redis, config)
        from gateway import limits
        # No limit configured: logins use the directory's plain lookup script.
        self.limits = limits.Limits(self.redis, config) if limits.enabled(config) else None
        if self.limits is None or not self.limits.counting:
            # Recent answers are reused unless sessions are counted: those counts are kept
            # in Redis, in the lookup's round trip (throttling alone checks only addresses
            # with failures: limits.FailedAddresses).
            self.directory.recent = cache.RecentLookups()
        from gateway.imap.referrals import ReferralPolicy
        self.referral_policy = ReferralPolicy(config)
        self.sessions: set = set()
        self.draining = False          # the gateway is stopping: /healthz answers 503
        from gateway import tls
        self.tls_context = tls.server_context(config)   # the master's (tls.preload)
        self.max_sessions = config.server.max_connections
        self.room_callbacks: list = []   # called when a full worker has room again
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}"
        self.move_listener = self._start_move_listener()
        import gevent
        self.sweeper = gevent.spawn(self.sweep)
        self.refresher = gevent.spawn(self.refresh_limits) if self.limits else None

    def new_session_id(self) -> str:
        return f"{self._id_prefix}.{next(self._ids):x}"

    def handler(self, listen):
        """A callable(socket, address) serving one client of this listener to the end."""
        if listen.protocol == "health":
            from gateway import health
            return health.handler(self)
        from gateway.imap.client import ImapSession
        from gateway.pop3.client import Pop3Session
        from gateway.logs import event
        from gateway.metrics import recorder
        from gateway.smtp.client import SmtpSession
        session_class = {"imap": ImapSession, "pop3": Pop3Session,
                         "submission": SmtpSession}.get(listen.protocol)
        if session_class is None:
            raise ValueError(f"protocol {listen.protocol!r} is not served yet")

        from gateway import proxyproto
        trusted = proxyproto.networks(listen.proxy_trusted)

        def handle(client: socket.socket, address) -> None:
            client, address = self.accept(client, address, listen, trusted)
            if client is None:
                return
            session = session_class(self, client, address, listen)
            if self.full():
                recorder.refused(listen.protocol, "worker")
                event(log, logging.WARNING, "refused", session=session.id,
                      proto=listen.protocol, client=session.client_address,
                      reason="server.max_connections reached in this worker")
                session.refuse("Too many connections, try again later")
                return
            recorder.opened(listen.protocol, listen.address)
            self.sessions.add(session)
            session.run()     # a logged-in session goes on in the relay after this returns
        return handle

    def accept(self, client, address, listen, trusted):
        """Before the greeting: the PROXY header (when the listener expects one) and the TLS
        handshake of an implicit-TLS listener, each bounded in time.  Returns (connection,
        client address) or (None, None) after closing a refused connection."""
        if not listen.proxy_protocol and listen.tls != "implicit":
            return client, address
        from gateway import proxyproto, tls
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        try:
            if listen.proxy_protocol:
                if not proxyproto.is_trusted(address[0], trusted):
                    raise proxyproto.ProxyError("PROXY header from an untrusted address")
                header = proxyproto.read_header(client)
                if header.source is not None:
                    address = header.source
            if listen.tls == "implicit":
                client = tls.handshake_metered(client, self.tls_context,
                                               self.config.tls.handshake_timeout)
        except (proxyproto.ProxyError, tls.TlsHandshakeError) as exc:
            from gateway.logs import event
            event(log, logging.INFO, "refused", client=peer, listener=listen.address,
                  reason=str(exc))
            client.close()
            return None, None
        return client, address

    def full(self) -> bool:
        """At ``max_connections`` open sessions (logging in or relayed): the worker stops
        accepting, so that the kernel hands new clients to another worker."""
        return len(self.sessions) >= self.max_sessions

    def forget(self, session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            if len(self.sessions) == self.max_sessions - 1:
                for callback in self.room_callbacks:
                    callback()

    def open_sessions(self) -> int:
        return len(self.sessions)

    def sweep(self) -> None:
        """Close relayed sessions idle past their protocol's idle_timeout (the relay has no
        per-read timers: one pass over the sessions every few seconds costs far less)."""
        import gevent
        timeouts = [self.config.imap.idle_timeout, self.config.pop3.idle_timeout,
                    self.config.submission.idle_timeout]
        interval = min(max(min(timeouts) / 4, 0.25), 10.0)
        while True:
            gevent.sleep(interval)
            now = time.monotonic()
            for session in list(self.sessions):
                if session.relay is not None and \
                        now - session.last_activity >= session.settings.idle_timeout:
                    session.idle_out()

    def refresh_limits(self) -> None:
        """Keep the shared connection counts of this worker's live sessions from expiring,
        and release those of ended sessions as soon as they end (in batches)."""
        import gevent
        from gevent.event import Event
        ended = Event()
        self.limits.wake = ended.set        # safe from an event-loop callback
        interval = max(self.config.limits.session_ttl / 3, 1.0)
        next_refresh = time.monotonic() + interval
        while True:
            ended.wait(max(0.0, next_refresh - time.monotonic()))
            ended.clear()
            self.limits.release_pending()
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + interval
                self.limits.refresh([s.admission for s in list(self.sessions)
                                     if s.admission is not None and s.admission.counted])

    def shutdown(self, graceful: bool = False) -> None:
        """Say a protocol goodbye to every open session and close it."""
        self.move_listener.stop()
        for session in list(self.sessions):
            session.goodbye("Server shutting down")

    # -- moves and kicks -----------------------------------------------------------------------

    def _start_move_listener(self):
        """A greenlet subscribed to the moves and kicks of every sync job and gateway host."""
        import gevent
        from gateway.directory.moves import MoveListener
        from gateway.directory.cache import connect

        def subscriber():
            return connect(self.config, self.redis_url, subscriber=True)
        listener = MoveListener(subscriber, self.close_sessions, sleep=gevent.sleep,
                                recent=self.directory.recent, limits=self.limits,
                                recheck=self.close_moved_sessions)
        gevent.spawn(listener.run)
        return listener

    def close_moved_sessions(self) -> int:
        """Look up every logged-in session's mailbox again and say goodbye to those whose
        home back-end changed: the moves published while this worker was cut off from Redis
        (pub/sub keeps nothing for it), or made by a sync into an empty cache (no diff, no
        moves published).  Returns how many were closed."""
        from gateway.directory.cache import DirectoryUnavailable
        from gateway.directory.moves import MOVED_TEXT
        from gateway.session import State
        closed = 0
        for session in list(self.sessions):
            home = getattr(session, "home_backend", "")
            if session.state is not State.PROXYING or session.closing or not home:
                continue
            try:
                record = self.directory.lookup(session.login_name)
            except DirectoryUnavailable as exc:
                log.warning("moves missed while disconnected not checked: %s", exc)
                break
            backend = self.config.backend(record.backend) if record is not None else None
            if backend is not None and backend.name != home:
                log.info("session=%s login=%s: moved to %s while this worker was cut off "
                         "from Redis", session.id, session.login_name, backend.name)
                session.goodbye(MOVED_TEXT)
                closed += 1
        log.info("routes of open sessions checked (Redis reconnect or reload): %d moved", closed)
        return closed

    def close_sessions(self, targets, text: str) -> int:
        """Say goodbye (``text``) to the sessions logged in, or logging in, under one of the
        targets' login names or mailbox ids; returns how many.  One scan for a whole batch."""
        from gateway.directory.records import normalize_login
        from gateway.session import State
        domain = self.config.directory.default_domain
        closed = 0
        for session in list(self.sessions):
            if session.state in (State.PREAUTH, State.CLOSED) or session.closing:
                continue
            try:
                login = normalize_login(session.login_name, domain)
            except ValueError:
                continue
            if targets.matches(login, session.mailbox_id):
                log.info("session=%s login=%s: %s", session.id, login, text)
                session.goodbye(text)
                closed += 1
        from gateway.directory.moves import KICKED_TEXT
        from gateway.metrics import recorder
        recorder.kicked("kick" if text == KICKED_TEXT else "move", closed)
        return closed
