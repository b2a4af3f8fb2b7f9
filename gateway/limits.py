"""Connection limits and failed-login throttling shared by every worker of every gateway host
through Redis, checked in the same round trip as the directory lookup.

Keys (beside the directory's, see records.py)::

    mailgate:lim:addr:<address>          zset  session id → expiry time: logged-in sessions
    mailgate:lim:login:<login>           zset  the same per normalized login name
    mailgate:lim:fail:<address>          hash  "" → failed logins from the address, <login> →
                                               those of one login from it (with a TTL)

A session counts from its login until it ends.  Its members carry an expiry time that each
worker pushes forward for its live sessions (``refresh``, every ``session_ttl / 3``), and every
admission first drops expired members, so a worker or host that dies leaks nothing for longer
than ``session_ttl``.  The keys themselves expire too.

Throttling follows Dovecot's auth penalty: each failed login from a client address (outside
``trusted_networks``) is answered after a delay that doubles with the failures so far
(``auth_failure_delay`` × 2^(n-1), at most ``auth_failure_max_delay``); past
``auth_failures_per_login`` failures of one login from one address, or
``auth_failures_per_address`` from one address, logins from there are refused without asking
any back-end, until ``auth_failure_window`` seconds pass without a failure from that address
(the address's hash expires as a whole).  The per-login count is kept per address, so an
attacker's failures never lock the real user out from another address.  A successful login
clears its login's count (only when there was one: the common path stays at one round
trip); the address count only decays, so an attacker cannot reset it with an account of
their own.

Without connection limits (only throttling, the default) a login from an address with no
recorded failures needs no round trip at all: each failure is published on the moves channel
and every worker of every host marks its address for ``auth_failure_window``
(``FailedAddresses``); only marked addresses are checked in Redis, and the lookup of the
others may come from the worker's recent answers.  Until a worker's subscription is up (and
has read the failures already recorded) it checks every address.  The price: failures on
other hosts are seen after the pub/sub latency, so a burst spread over hosts can pass the
limit by the attempts made in that time.

An "address" here is the client as the limits count it (``client_key``): an IPv4 address,
or an IPv6 client's network of ``ipv6_prefix`` bits (default /64).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time

import redis

from gateway.directory import records

log = logging.getLogger("mailgate.limits")

PREFIX = records.KEY_PREFIX + "lim:"
OK, THROTTLED, OVER_ADDRESS, OVER_LOGIN = "ok", "throttled", "per-address", "per-login"
FAILED_SIZE = 100_000     # addresses a worker keeps marked; past that it checks every address

# KEYS[1] = directory pointer key.  ARGV: 1 generation key prefix, 2 normalized login,
# 3 negative-answer prefix (as LOOKUP_SCRIPT), 4 limits key prefix, 5 client address,
# 6 session id, 7 session ttl (s), 8 max per address, 9 max per login, 10 "1" to check
# failures, 11 failures per address, 12 failures per (address, login).
# Returns {generation, record or false, negative, status, address failures, pair failures}.
# Key names are built in the script (one Redis, not a Cluster: see README).
LOGIN_SCRIPT = """
local prefix, address, login = ARGV[4], ARGV[5], ARGV[2]
local status, fail_address, fail_pair = 'ok', 0, 0
if ARGV[10] == '1' then
    local counts = redis.call('HMGET', prefix .. 'fail:' .. address, '', login)
    fail_address, fail_pair = tonumber(counts[1] or '0'), tonumber(counts[2] or '0')
    local per_address, per_login = tonumber(ARGV[11]), tonumber(ARGV[12])
    if (per_login > 0 and fail_pair >= per_login)
            or (per_address > 0 and fail_address >= per_address) then
        status = 'throttled'
    end
end
local counted = {}
if status == 'ok' and (ARGV[8] ~= '0' or ARGV[9] ~= '0') then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
    for _, limit in ipairs({{'addr:' .. address, ARGV[8], 'per-address'},
                            {'login:' .. login, ARGV[9], 'per-login'}}) do
        local max = tonumber(limit[2])
        if max > 0 and status == 'ok' then
            local key = prefix .. limit[1]
            redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
            if redis.call('ZCARD', key) >= max then
                status = limit[3]
            else
                counted[#counted + 1] = key
            end
        end
    end
    if status == 'ok' then
        local ttl = tonumber(ARGV[7])
        for _, key in ipairs(counted) do
            redis.call('ZADD', key, now + ttl, ARGV[6])
            redis.call('EXPIRE', key, math.ceil(ttl))
        end
    end
end
local generation = redis.call('GET', KEYS[1])
local record = false
if generation and status == 'ok' then
    record = redis.call('HGET', ARGV[1] .. generation, login)
end
local negative = 0
if not record then
    negative = redis.call('EXISTS', ARGV[3] .. login)
end
return {generation, record, negative, status, fail_address, fail_pair}
"""


def client_key(address: str, ipv6_prefix: int = 128) -> str:
    """The client a limit counts for ``address``: an IPv4 address itself, an IPv6 one as
    its network of ``ipv6_prefix`` bits ("2001:db8:1:2::/64"), so that one subscriber,
    who holds a whole /64 and may pick any address in it for each connection, is one
    client (Dovecot's auth penalty groups IPv6 by /48 for the same reason).  An
    IPv4-mapped address (``::ffff:192.0.2.1``, a dual-stack listener) is its IPv4 address;
    anything else (a Unix socket's path) is kept as it is."""
    if ":" not in address:
        return address          # IPv4, the common case: nothing to parse
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ipv6_prefix >= 128:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


class FailedAddresses:
    """The client addresses with recent failed logins, as far as this worker has heard (its
    own and those published by every worker of every host); the others are ``clean``.

    Nothing is clean while the moves subscription is down (``watching`` False): a message
    could be missed.  A mark lasts ``window`` seconds after the last failure heard, like the
    failure counts in Redis.  Too many marks (an attack from many addresses) are all dropped
    and every address is checked for one window, which bounds the memory."""

    def __init__(self, window: float, size: int = FAILED_SIZE, clock=time.monotonic):
        self.window = window
        self.size = size
        self.clock = clock
        self.marks: dict[str, float] = {}
        self.watching = False
        self.blind_until = 0.0

    def clean(self, address: str) -> bool:
        """Whether no failure from ``address`` is known to be counted now."""
        if not self.watching:
            return False
        marks = self.marks
        if marks:
            expiry = marks.get(address)
            if expiry is not None:
                if expiry > self.clock():
                    return False
                del marks[address]
        return not self.blind_until or self.blind_until <= self.clock()

    def mark(self, address: str) -> None:
        """A failed login from ``address`` was counted (here or elsewhere)."""
        if len(self.marks) >= self.size and address not in self.marks:
            self.marks.clear()
            self.blind_until = self.clock() + self.window
        self.marks[address] = self.clock() + self.window

    def watch(self, addresses) -> None:
        """The subscription is up and ``addresses`` have failures counted in Redis now."""
        self.marks.clear()
        for address in addresses:
            self.mark(address)
        self.watching = True

    def unwatch(self) -> None:
        """The subscription is down: every address is checked."""
        self.watching = False
        self.marks.clear()


class Limits:
    """One worker's view of the shared limits (``config.limits``); Redis errors in the
    bookkeeping after admission are logged, never raised into a session."""

    def __init__(self, client: redis.Redis, config):
        self.redis = client
        self.settings = config.limits
        self.base_delay = config.server.auth_failure_delay
        self.trusted = [ipaddress.ip_network(n, strict=False)
                        for n in self.settings.trusted_networks]
        self.host = socket.gethostname()
        self.counting = bool(self.settings.max_connections_per_address
                             or self.settings.max_connections_per_login)
        self.throttling = bool(self.settings.auth_failures_per_address
                               or self.settings.auth_failures_per_login)
        self.script = client.register_script(LOGIN_SCRIPT)
        settings = self.settings
        # ARGV[7..12] of LOGIN_SCRIPT, made once (strings: nothing to convert per login).
        self.untrusted_args = [str(value) for value in (
            settings.session_ttl, settings.max_connections_per_address,
            settings.max_connections_per_login, 1 if self.throttling else 0,
            settings.auth_failures_per_address,
            settings.auth_failures_per_login)]
        self.trusted_args = self.untrusted_args[:3] + ["0"] + self.untrusted_args[4:]
        self.pending: list[Admission] = []     # ended sessions whose counts are to go
        self.wake = lambda: None               # the worker sets this to wake its releaser
        self.failed = FailedAddresses(self.settings.auth_failure_window)

    def round_trip(self, admission: "Admission") -> bool:
        """Whether this login must be checked in Redis: always when sessions are counted,
        else only for an untrusted address with failures heard of (or while deaf to them)."""
        return self.counting or not (admission.trusted or self.failed.clean(admission.address))

    def subscribed(self, connected: bool) -> None:
        """The moves subscription is up or down.  Up: read the addresses whose failures
        Redis counts now (a SCAN of their hashes), then trust the others.  Raises the
        Redis error when that read fails (the listener subscribes again)."""
        if not connected:
            self.failed.unwatch()
            return
        self.failed.unwatch()
        if not self.throttling:
            self.failed.watch(())
            return
        start = len(PREFIX) + len("fail:")
        self.failed.watch([key[start:].decode(errors="replace") for key in
                           self.redis.scan_iter(match=f"{PREFIX}fail:*", count=1000)])

    def admission(self, address: str, session_id: str) -> "Admission":
        return Admission(self, client_key(address, self.settings.ipv6_prefix),
                         f"{self.host}:{session_id}", self.is_trusted(address))

    def is_trusted(self, address: str) -> bool:
        if not self.trusted:
            return False         # (the common case: no address to parse per login)
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def delay(self, fail_address: int, fail_pair: int) -> float:
        """Seconds a failed login's answer waits, given the failures counted so far."""
        settings = self.settings
        scaled = fail_address * settings.auth_failures_per_login // max(
            settings.auth_failures_per_address, 1)
        failures = max(fail_pair, scaled, 1)
        return min(self.base_delay * 2 ** min(failures - 1, 30),
                   max(settings.auth_failure_max_delay, self.base_delay))

    def release_pending(self) -> None:
        """Release the counts of the sessions that ended since the last call."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for admission in pending:
                for key in admission.keys():
                    pipe.zrem(key, admission.member)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("%d session counts not released (they expire): %s", len(pending), exc)

    def refresh(self, admissions) -> None:
        """Push the expiry of live sessions' members forward (one pipeline per call)."""
        if not self.counting:
            return
        ttl = self.settings.session_ttl
        try:
            now = self.redis.time()
            expiry = now[0] + now[1] / 1e6 + ttl
            pipe = self.redis.pipeline(transaction=False)
            for admission in admissions:
                for key in admission.keys():
                    pipe.zadd(key, {admission.member: expiry}, xx=True)
                    pipe.expire(key, int(ttl) + 1)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("session limits not refreshed: %s", exc)


def enabled(config) -> bool:
    """Whether any shared limit is configured (else logins use the plain lookup)."""
    settings = config.limits
    return bool(settings.max_connections_per_address or settings.max_connections_per_login
                or settings.auth_failures_per_address or settings.auth_failures_per_login)


class Admission:
    """One login's pass through the limits: ``args()`` for the script, then the answer."""

    __slots__ = ("limits", "address", "member", "trusted", "login", "status",
                 "fail_address", "fail_pair", "counted")

    def __init__(self, limits: Limits, address: str, member: str, trusted: bool):
        self.limits = limits
        self.address = address
        self.member = member
        self.trusted = trusted
        self.login = ""
        self.status = OK
        self.fail_address = self.fail_pair = 0
        self.counted = False

    def run(self, keys: list, args: list) -> list:
        """The lookup script's arguments plus ours, in one EVALSHA; returns the lookup part
        of the answer (generation, record, negative) and keeps the rest."""
        limits = self.limits
        self.login = args[1]
        args += [PREFIX, self.address, self.member]
        args += limits.untrusted_args if not self.trusted else limits.trusted_args
        answer = limits.script(keys=keys, args=args)
        self.status = answer[3].decode() if isinstance(answer[3], bytes) else answer[3]
        self.fail_address, self.fail_pair = int(answer[4]), int(answer[5])
        self.counted = self.status == OK and self.limits.counting
        return [answer[0], answer[1] or None, answer[2]]

    def keys(self) -> list[str]:
        settings = self.limits.settings
        keys = []
        if settings.max_connections_per_address:
            keys.append(f"{PREFIX}addr:{self.address}")
        if settings.max_connections_per_login:
            keys.append(f"{PREFIX}login:{self.login}")
        return keys

    def failed(self, auth_failed: bool) -> float:
        """The login failed: release the count; an authentication failure is counted and
        returns the delay before answering (one pipeline)."""
        pipe = self.limits.redis.pipeline(transaction=False)
        if self.counted:
            for key in self.keys():
                pipe.zrem(key, self.member)
            self.counted = False
        count_it = auth_failed and not self.trusted and self.login and self.limits.throttling
        if count_it:
            key = f"{PREFIX}fail:{self.address}"
            pipe.hincrby(key, "", 1)
            pipe.hincrby(key, self.login, 1)
            pipe.expire(key, int(self.limits.settings.auth_failure_window))
            # After the count: whoever hears of it checks the address and finds it counted.
            pipe.publish(records.MOVES_CHANNEL, records.failed_message(self.address))
            self.limits.failed.mark(self.address)
        try:
            answers = pipe.execute() if len(pipe) else []
        except (redis.RedisError, OSError) as exc:
            log.warning("login failure not counted: %s", exc)
            return self.limits.base_delay if auth_failed else 0.0
        if not count_it:
            return self.limits.base_delay if auth_failed else 0.0
        self.fail_address, self.fail_pair = int(answers[-4]), int(answers[-3])
        return self.limits.delay(self.fail_address, self.fail_pair)

    def succeeded(self) -> None:
        """Clear the pair's failures, only when there were some (else no round trip)."""
        if self.fail_pair and not self.trusted:
            try:
                self.limits.redis.hdel(f"{PREFIX}fail:{self.address}", self.login)
            except (redis.RedisError, OSError) as exc:
                log.warning("login failures not cleared: %s", exc)

    def ended(self) -> None:
        """The session ended: its counts go.  Often called from an event-loop callback (the
        relay), where no I/O may block: the release is queued for ``Limits.release_pending``,
        which a worker greenlet runs (one pipeline for every session that ended meanwhile)."""
        if not self.counted:
            return
        self.counted = False
        self.limits.pending.append(self)
        self.limits.wake()
