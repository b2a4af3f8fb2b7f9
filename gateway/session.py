"""The protocol-free half of a proxied session, shared by IMAP and POP3.

Like Dovecot's login-proxy.c: named states logged on disconnect, failures classified once
(``Failure``), one place that routes a login and connects to its back-end.  A protocol adds
its pre-auth dialogue, its back-end login and its answers behind the same few methods.
"""
from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass

from gateway import limits as limits_mod
from gateway.config import BackendConfig
from gateway.directory.cache import DirectoryUnavailable
from gateway.directory.records import normalize_login
from gateway.logs import event, held_event, readable
from gateway.metrics import recorder
from gateway.stream import is_tls, plain_socket_type, throw_after, wait_io

log = logging.getLogger("mailgate.session")


class State(enum.Enum):
    """(Read as ``state._value_`` at every session's end: ``.value`` is two Python calls.)"""
    PREAUTH = "preauth"
    LOGIN = "backend-login"      # connect, greeting and login at the back-end: one phase
    PROXYING = "proxying"
    CLOSED = "closed"


class Failure(enum.Enum):
    """Why a login did not reach a proxied session; each protocol maps these to answers."""
    AUTH_FAILED = "auth-failed"      # unknown user or wrong password: never told apart
    UNAVAILABLE = "unavailable"      # directory, back-end or network trouble: try again
    PROTOCOL = "protocol"            # the back-end said something we cannot use
    LIMIT = "limit"                  # too many sessions for this address or login
    THROTTLED = "throttled"          # too many failed logins from this address


class LoginError(Exception):
    """A classified login failure; ``detail`` is for the log only, never for the client."""

    def __init__(self, failure: Failure, detail: str):
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


class ClientGone(Exception):
    """The client closed, timed out or broke the protocol beyond an answer."""


class TooManyFailures(ClientGone):
    """Too many failed logins or bad commands: the protocol says goodbye and closes."""


# Linux copies TCP_NODELAY from a listening socket (set in workers/sockets.py) to the
# sockets it accepts; elsewhere each client socket is set on its own.
NODELAY_INHERITED = sys.platform.startswith("linux")

MAX_CREDENTIALS = 4096   # login name + password bytes; longer ones fail like a wrong password


@dataclass(frozen=True)
class Target:
    """One back-end to log in at: its configuration and the login name it knows there."""
    config: BackendConfig
    login_name: str
    mailbox: str | None = None     # set by a mailbox referral


@dataclass(frozen=True)
class Route:
    """The directory's answer for a login: who (normalised name, mailbox id) and where."""
    login_name: str
    mailbox_id: str                # the directory's id of the mailbox: moves close by it too
    target: Target


def route(service, login_name: str, admission=None) -> Route:
    """Look the login up and pass the shared limits (one Redis round trip together) and
    resolve its back-end; raises LoginError."""
    try:
        normalized = normalize_login(login_name, service.config.directory.default_domain)
        record = service.directory.lookup_normalized(normalized, admission)
    except DirectoryUnavailable as exc:
        raise LoginError(Failure.UNAVAILABLE, f"directory unavailable: {exc}") from None
    except ValueError as exc:
        raise LoginError(Failure.AUTH_FAILED, f"bad login name: {exc}") from None
    if admission is not None and admission.status != limits_mod.OK:
        if admission.status == limits_mod.THROTTLED:
            raise LoginError(Failure.THROTTLED, "too many failed logins")
        raise LoginError(Failure.LIMIT, f"{admission.status} connection limit reached")
    if record is None:
        if service.config.directory.miss == "unavailable":
            raise LoginError(Failure.UNAVAILABLE, "not in the directory cache")
        raise LoginError(Failure.AUTH_FAILED, "unknown user")
    backend_config = service.config.backend(record.backend)
    if backend_config is None:
        raise LoginError(Failure.UNAVAILABLE, f"directory names unknown back-end {record.backend!r}")
    target = Target(backend_config, record.backend_login or normalized)
    return Route(normalized, record.mailbox_id, target)


def connect(backend_config: BackendConfig, protocol: str) -> socket.socket:
    """A TCP connection to the back-end's port for ``protocol``; raises LoginError.

    The one place a back-end socket is opened (TLS to the back-end wraps this).  Over plain
    TCP every protocol here starts with the server's greeting, so the connect waits until the
    back-end has sent its first bytes (or failed): one wait for the connection and the
    greeting together, and ``mailgate_backend_connect_seconds`` is the time to the greeting."""
    address = (backend_config.address, backend_config.port(protocol))
    started = time.perf_counter()
    try:
        family = _numeric_family(backend_config.address)
        if family is None:
            sock = socket.create_connection(address, timeout=backend_config.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            # An address literal needs no resolver (gevent's would take a thread-pool trip).
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _connect(sock, address, backend_config.connect_timeout,
                         until_greeting=backend_config.tls == "none")
            except OSError:
                sock.close()
                raise
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        recorder.backend_connect(backend_config.name, None)
        raise LoginError(Failure.UNAVAILABLE,
                         f"connect {backend_config.name} {address[0]}:{address[1]}: {reason}") from None
    recorder.backend_connect(backend_config.name, time.perf_counter() - started)
    if backend_config.tls != "none":
        return _secure(sock, backend_config, protocol)
    return sock


def backend_phase(backend_config: BackendConfig, protocol: str, log_in):
    """``log_in(sock)`` on a new connection to the back-end (:func:`connect`), the whole
    phase (connect, greeting, login) within the back-end's connect_timeout + login_timeout;
    past it, LoginError UNAVAILABLE.  The protocols' one back-end deadline: after the
    connect the socket has no timeout of its own, so the readers ``log_in`` makes take none
    as their idle bound and no read makes, starts and closes a timer of its own."""
    total = backend_config.connect_timeout + backend_config.login_timeout
    # A BaseException, as gevent's Timeout: no ``except Exception`` on the way may take it
    # for an error of its own.
    expired = _PhaseExpired()
    timer = throw_after(total, expired)
    try:
        sock = connect(backend_config, protocol)
        sock.settimeout(None)
        return log_in(sock)
    except _PhaseExpired as exc:
        if exc is not expired:
            raise
        raise LoginError(Failure.UNAVAILABLE, f"backend {backend_config.name}: no login "
                                              f"answer within {total:g}s") from None
    finally:
        timer.close()


class _PhaseExpired(BaseException):
    """backend_phase's deadline passed (thrown into the session's greenlet)."""


def _connect(sock, address, timeout: float, until_greeting: bool = False) -> None:
    """``sock.connect(address)`` in at most ``timeout`` seconds with one connect(2), one wait
    and one SO_ERROR read (gevent's connect asks SO_ERROR first and connects a second time
    after the wait: two calls more per login).  ``until_greeting``: the wait is for the
    first bytes from the server, not for the connection alone (no second wait, and no
    switch of the watched events, before the greeting is read).  ``sock`` keeps
    ``timeout`` afterwards."""
    watcher = getattr(sock, "_read_event" if until_greeting else "_write_event", None)
    if watcher is None:                               # not a gevent socket
        sock.settimeout(timeout)
        sock.connect(address)
        return
    raw = sock._sock         # non-blocking: connect_ex answers EINPROGRESS, no exception
    error = raw.connect_ex(address)
    if error in (errno.EINPROGRESS, errno.EAGAIN):
        wait_io(watcher, timeout, socket.timeout)
        error = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
    sock.settimeout(timeout)


def _secure(sock, backend: BackendConfig, protocol: str):
    """[backends.NAME] tls: implicit TLS or STARTTLS/STLS, the certificate verified."""
    from gateway import tls
    try:
        if backend.tls == "implicit":
            return tls.wrap_client(sock, backend, backend.connect_timeout)
        return tls.starttls_client(sock, backend, protocol, backend.connect_timeout)
    except (tls.TlsError, OSError) as exc:
        sock.close()
        reason = "timed out" if isinstance(exc, socket.timeout) else \
            (getattr(exc, "strerror", None) or str(exc))
        event(log, logging.WARNING, "backend-tls-refused", backend=backend.name,
              tls=backend.tls, reason=reason)
        raise LoginError(Failure.UNAVAILABLE, f"backend {backend.name}: TLS: {reason}") from None


def _numeric_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an address literal, None for a name to resolve."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except OSError:
            continue
    return None


_listen_local: dict[str, tuple[str, int] | None] = {}


def local_address(listen, sock) -> tuple[str, int]:
    """The (address, port) a client connected to: the listener's own when it is bound to
    one IP address (no getsockname per session), else the socket's."""
    known = _listen_local.get(listen.address, False)
    if known is False:
        host, port = listen.host_port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:       # a host name: whatever it resolved to, ask the socket
            ip = None
        known = (str(ip), port) if ip is not None and not ip.is_unspecified else None
        _listen_local[listen.address] = known
    if known is not None:
        return known
    local = sock.getsockname()
    return local[0], local[1]


class Session:
    """One client connection: identity, counters, state and the end-of-session log line."""

    protocol = "?"

    def __init__(self, service, client: socket.socket, address, listen):
        self.service = service
        self.client = client
        self.client_address = address[0] if isinstance(address, tuple) else str(address)
        self.client_port = address[1] if isinstance(address, tuple) else 0
        self.listen = listen
        self.id = service.new_session_id()
        self.state = State.PREAUTH
        self.started = time.monotonic()
        self.last_activity = self.started
        self.login_name = ""
        self.mailbox_id = ""    # the directory's id of the mailbox: moves close by it too
        self.backend_name = ""  # the [backends] name (or referred host:port) logged in at
        self.home_backend = ""  # the directory's back-end at login (a referral may differ)
        self.backend_sock: socket.socket | None = None
        self.bytes_in = 0       # client → gateway
        self.bytes_out = 0      # gateway → client
        self.end_reason = ""
        self.closing = False
        self.login_failures = 0
        self.admission = None   # limits.Admission of the login in progress or done
        self.tls = is_tls(client)   # implicit TLS, or after STARTTLS
        if not NODELAY_INHERITED:
            try:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    # -- TLS (gateway.tls) ----------------------------------------------------------------

    @property
    def can_start_tls(self) -> bool:
        """STARTTLS/STLS is offered: a "starttls" listener, not yet encrypted."""
        return self.listen.tls == "starttls" and not self.tls

    @property
    def login_allowed(self) -> bool:
        """[[listen]] require_tls_for_login: no credentials in clear text."""
        return self.tls or not self.listen.require_tls_for_login

    def start_tls(self) -> None:
        """The server handshake on the client connection (after the protocol's "go ahead"),
        then a new reader: every byte read before is dropped (RFC 3207 §4.2, RFC 2595 §4).
        The protocol supplies ``new_reader(sock)``; the pre-login bounds carry over."""
        from gateway import tls
        try:
            self.client = tls.handshake_metered(self.client, self.service.tls_context,
                                                self.service.config.tls.handshake_timeout)
        except tls.TlsHandshakeError as exc:
            raise ClientGone(str(exc)) from None
        old, self.reader = self.reader, self.new_reader(self.client)
        self.reader.idle_timeout, self.reader.deadline = old.idle_timeout, old.deadline
        self.tls = True

    # -- the session's life -------------------------------------------------------------------

    def run(self) -> None:
        """Greet, answer commands until login, relay; log one line at the end, whatever happens."""
        try:
            self.send(self.greeting())
            # Idle bound per read, and a total one for the whole dialogue (slowloris).
            self.reader.idle_timeout = self.settings.preauth_timeout
            self.reader.deadline = self.started + self.settings.login_deadline
            while self.state is State.PREAUTH and not self.closing:
                self.next_command()
            if self.state is State.PROXYING and not self.closing:
                self.proxy()
        except ClientGone as exc:
            self.end(str(exc))
        except Exception:  # noqa: BLE001 - one session's bug must not kill the worker
            log.exception("session=%s internal error", self.id)
            self.end("internal error")
            self.try_send(self.internal_error_line)
        finally:
            if self.relay is None:      # a relayed session ends in relay_closed()
                self.close()
                self.finished()

    def try_send(self, data: bytes) -> None:
        """Best effort (a goodbye): never raises, never blocks a relayed session."""
        if self.relay is not None:
            self.relay.send_to_client(data)
            return
        try:
            self.send(data)
        except ClientGone:
            pass

    # -- the relay after login --------------------------------------------------------------------

    relay = None

    def hand_over(self, client_pending: bytes, backend_pending: bytes, observe=None,
                  rewrite=None) -> None:
        """Forward what was read ahead, then give both sockets to the event-loop relay.

        The session's greenlet ends after this; the relay calls relay_ended() and then
        relay_closed() when either side stops.
        """
        from gateway.relay import for_session
        try:
            if backend_pending:
                self.send(backend_pending)
            if client_pending:
                if observe is not None:
                    observe(client_pending, len(client_pending))
                self.backend_sock.sendall(client_pending)
                self.bytes_in += len(client_pending)
        except OSError as exc:
            self.end(f"backend write error: {exc.strerror or exc}")
            return
        self.relay = for_session(self, self.client, self.backend_sock, observe, rewrite)
        self.client = self.backend_sock = None
        self.relay.start()

    def relay_ended(self, ending) -> None:
        """The relay stopped (sockets still open): the protocol may say goodbye here."""
        self.end(f"{ending.side} {ending.reason}")

    def relay_closed(self) -> None:
        self.finished()

    def idle_out(self) -> None:
        """Called by the worker's sweep when a relayed session has been idle too long."""
        if self.relay is not None:
            self.relay.finish("client", "idle timeout")

    def finished(self) -> None:
        if self.admission is not None:
            self.admission.ended()
        recorder.closed(self.protocol, self.listen.address, self.state._value_, self.bytes_in,
                        self.bytes_out)
        self.log_end()
        self.service.forget(self)

    # The protocol part: what the client sees first, reads, and gets when the server ends it.
    internal_error_line = b""
    reader = None     # the protocol's gateway.stream reader of the client, until login
    # How a pre-login read that cannot go on ends: (exception class, goodbye line or b"",
    # reason for the log or "" for the exception's own text); the first match wins.
    read_failures: tuple = ()

    def read_failed(self, exc: Exception) -> ClientGone:
        """Say the protocol's goodbye for a failed read; the ClientGone that ends the session."""
        for kind, line, reason in self.read_failures:
            if isinstance(exc, kind):
                if line:
                    self.try_send(line)
                return ClientGone(reason or str(exc))
        return ClientGone(str(exc))

    def new_reader(self, client):
        """A fresh pre-login reader of ``client`` (made again after STARTTLS/STLS)."""
        raise NotImplementedError

    def greeting(self) -> bytes:
        raise NotImplementedError

    def next_command(self) -> None:
        raise NotImplementedError

    def proxy(self) -> None:
        raise NotImplementedError

    def goodbye_line(self, text: str) -> bytes:
        raise NotImplementedError

    # -- the login, shared by the protocols ------------------------------------------------

    max_login_failures = 5

    def login(self, login_name: str, password: str, mechanism: str) -> bool:
        """Route the login, open the back-end and replay the login there; True when proxying.

        The protocol supplies ``open_backend(target, password, mechanism)`` (connect, greet,
        log in; returns what ``answer_success`` needs and sets ``backend_sock`` and
        ``backend_name``) and ``answer_failure(failure)``.
        """
        started = time.monotonic()
        self.login_name = login_name
        limits = self.service.limits
        self.admission = limits.admission(self.client_address, self.id) if limits else None
        try:
            if len(login_name.encode()) + len(password.encode()) > MAX_CREDENTIALS:
                raise LoginError(Failure.AUTH_FAILED, "credentials too long")
            found = route(self.service, login_name, self.admission)
            self.state = State.LOGIN
            result = self.while_client_waits(
                lambda: self.open_backend(found.target, password, mechanism))
        except LoginError as exc:
            self.drop_backend()
            self.login_failed(exc, started)
            return False
        self.login_name = found.login_name
        self.mailbox_id = found.mailbox_id
        self.home_backend = found.target.config.name   # where the directory routed it (moves)
        self.state = State.PROXYING
        if self.admission is not None:
            self.admission.succeeded()
        recorder.login(self.protocol, "ok")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session=%s proto=%s login=%s backend=%s mechanism=%s", self.id,
                      self.protocol, readable(found.login_name), self.backend_name, mechanism)
        self.answer_success(result)
        return True

    def while_client_waits(self, backend_phase):
        """Run ``backend_phase()``; a client that hangs up meanwhile ends it at once
        (ClientGone), so a slow back-end does not keep both connections of a dead login.

        The watch is a callback on the event loop, not a greenlet: every login pays for it,
        and a greenlet's spawn, switches and kill cost more than the login's own reads."""
        import gevent
        phase = gevent.getcurrent()
        client = self.client
        # A plain socket lends its own read watcher (idle while this greenlet talks to the
        # back-end): a new one would cost an fcntl and an epoll_ctl per login.
        own = type(client) is plain_socket_type() and client._read_event.callback is None
        watcher = client._read_event if own else gevent.get_hub().loop.io(client.fileno(), 1)

        def readable() -> None:
            watcher.stop()
            try:
                # The descriptor is readable, so this peek returns at once (bytes or EOF).
                gone = not client.recv(1, socket.MSG_PEEK)
            except OSError:
                gone = True
            except Exception:  # noqa: BLE001 - a surprise here must not reach the loop
                gone = False
            if gone:      # (bytes pipelined behind the login are no hang-up: stop watching)
                phase.kill(ClientGone("client closed during the back-end login"), block=False)

        watcher.start(readable)
        try:
            return backend_phase()
        finally:
            watcher.stop()
            if not own:
                watcher.close()

    def login_failed(self, exc: LoginError, started: float) -> None:
        self.state = State.PREAUTH
        auth_failed = exc.failure is Failure.AUTH_FAILED
        penalty = self.service.config.server.auth_failure_delay if auth_failed else 0.0
        if exc.failure is Failure.THROTTLED:
            penalty = self.service.config.server.auth_failure_delay
        elif self.admission is not None:
            penalty = self.admission.failed(auth_failed)
        recorder.login(self.protocol, exc.failure.value)
        if exc.failure in (Failure.LIMIT, Failure.THROTTLED):
            recorder.refused(self.protocol, self.admission.status)
        event(log, logging.INFO if auth_failed else logging.WARNING, "login-failed",
              session=self.id, proto=self.protocol, client=self.client_address,
              login=self.login_name, reason=exc.failure.value, detail=exc.detail,
              delay=penalty)
        # Unknown user and wrong password are answered alike and after the same delay,
        # which grows with the failures from this address (limits.Limits.delay).
        delay = penalty - (time.monotonic() - started)
        if delay > 0:
            time.sleep(delay)   # gevent-patched in workers
        self.answer_failure(exc.failure)
        self.login_failures += 1
        if self.login_failures >= self.max_login_failures:
            raise TooManyFailures("too many login failures")

    def drop_backend(self) -> None:
        if self.backend_sock is not None:
            try:
                self.backend_sock.close()
            except OSError:
                pass
            self.backend_sock = None

    def open_backend(self, target: Target, password: str, mechanism: str):
        raise NotImplementedError

    def answer_success(self, result) -> None:
        raise NotImplementedError

    def answer_failure(self, failure: Failure) -> None:
        raise NotImplementedError

    # -- output to the client ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write to the client; a dead client becomes ClientGone."""
        try:
            self.client.sendall(data)
        except OSError as exc:
            raise ClientGone(f"send failed: {exc.strerror or exc}") from None
        self.bytes_out += len(data)
        if self.reader is not None:      # before login the client answers what we say
            self.reader.answer_due = True

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def end(self, reason: str) -> None:
        if not self.end_reason:
            self.end_reason = reason

    def refuse(self, text: str) -> None:
        """Turn a connection away before its session starts (worker full)."""
        self.try_send(self.goodbye_line(text))
        self.close()

    def goodbye(self, text: str) -> None:
        """Server-initiated close (shutdown, kick): the protocol's goodbye line, then close."""
        self.try_send(self.goodbye_line(text))
        self.end(text)
        self.closing = True
        if self.relay is not None:
            self.relay.finish("gateway", text)
        else:
            self.close()

    def close(self) -> None:
        for sock in (self.backend_sock, self.client):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    def log_end(self) -> None:
        """The one line a session leaves: who, where, how far it got, bytes and time."""
        held_event(log, logging.INFO, "session-end", session=self.id, proto=self.protocol,
                   client=self.client_address, port=self.client_port, login=self.login_name,
                   backend=self.backend_name, listener=self.listen.address, tls=self.tls,
                   state=self.state._value_, duration=time.monotonic() - self.started,
                   bytes_in=self.bytes_in, bytes_out=self.bytes_out, end=self.end_reason)
