"""TOML configuration → frozen dataclasses.

Every error names the file, the key and the reason (``ConfigError``).  Unknown keys are
rejected so that a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("imap", "pop3", "submission", "health")
TLS_MODES = ("none", "starttls", "implicit")


class ConfigError(Exception):
    """A configuration problem; str() is one line naming file, key and reason."""


@dataclass(frozen=True)
class ServerConfig:
    workers: int = 0                 # 0 = one per CPU
    graceful_timeout: float = 30.0   # seconds open sessions get on TERM / HUP
    # On TERM: seconds the gateway goes on accepting while /healthz already answers 503,
    # so that the load balancer stops sending first (0 = stop accepting at once).
    drain_delay: float = 0.0
    probe_backends: bool = True      # at start, log each back-end a TCP connect cannot reach
    max_connections: int = 10000     # per worker; accepting pauses when full
    heartbeat_timeout: float = 10.0  # a worker silent this long is killed and replaced
    auth_failure_delay: float = 2.0  # a failed login is answered no sooner than this
    pidfile: str = ""
    run_dir: str = "run"             # embedded Redis socket, relative to the working directory
    log_level: str = "info"
    log_format: str = "text"         # "text" (key=value events) | "json" (one object a line)
    status_interval: float = 2.0     # the master rewrites <run_dir>/status.json this often

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


LOOPBACK_CIDRS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class ListenConfig:
    protocol: str = "imap"
    address: str = ""
    tls: str = "none"
    # Default: on unless bound to loopback (set by _listeners from the address).
    require_tls_for_login: bool = False
    proxy_protocol: bool = False
    proxy_trusted: tuple[str, ...] = LOOPBACK_CIDRS   # who may send a PROXY header

    @property
    def host_port(self) -> tuple[str, int]:
        return split_address(self.address)


@dataclass(frozen=True)
class CertificateConfig:
    """One more certificate, chosen by SNI for ``server_names`` ("*.example.com" allowed)."""
    cert_file: str = ""
    key_file: str = ""
    chain_file: str = ""
    server_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str = ""
    key_file: str = ""
    chain_file: str = ""                # intermediates, if not appended to cert_file
    min_version: str = "1.2"            # "1.2" | "1.3"
    ciphers: str = ""                   # OpenSSL cipher list for TLS 1.2 ("" = modern default)
    session_cache: bool = True          # server-side session resumption (per worker)
    session_tickets: bool = True        # RFC 5077 tickets (resumption across workers' restarts)
    session_lifetime: float = 300.0     # seconds a session may be resumed
    handshake_timeout: float = 10.0     # whole handshake bound
    certificates: tuple[CertificateConfig, ...] = ()


@dataclass(frozen=True)
class RedisConfig:
    url: str = ""          # "" = embedded private redis-server started by the master
    timeout: float = 2.0   # socket connect/read timeout for lookups
    sentinels: tuple[str, ...] = ()   # "host:port" of Redis Sentinels (then url is unused)
    service_name: str = ""            # the Sentinel service (master group) name
    sentinel_password: str = ""       # AUTH for the Sentinels, if they require one
    password: str = ""                # AUTH for the Redis servers found through Sentinel
    db: int = 0                       # database index with Sentinel


@dataclass(frozen=True)
class LimitsConfig:
    """Limits shared by every worker of every gateway host through Redis (0 = no limit)."""
    max_connections_per_address: int = 0   # logged-in sessions per client address
    max_connections_per_login: int = 0     # logged-in sessions per login name
    session_ttl: float = 300.0             # a session's count expires unless refreshed
    auth_failures_per_address: int = 100   # failed logins from one address, then refused
    auth_failures_per_login: int = 10      # failed logins of one login from one address
    auth_failure_window: float = 300.0     # failures are forgotten this long after the last
    auth_failure_max_delay: float = 15.0   # the growing delay stops growing here
    trusted_networks: tuple[str, ...] = ()  # CIDRs exempt from failure throttling
    ipv6_prefix: int = 64                  # an IPv6 client counts as its /64 (one subscriber)


@dataclass(frozen=True)
class ProtocolConfig:
    banner: str = ""
    preauth_timeout: float = 60.0     # idle timeout before login
    idle_timeout: float = 1800.0      # idle timeout after login
    max_line: int = 65536             # longest command line accepted
    max_login_literal: int = 8192     # largest literal accepted before login
    login_deadline: float = 120.0     # total seconds for the whole dialogue before login


@dataclass(frozen=True)
class SubmissionConfig:
    """[submission]: the SMTP submission front end (RFC 6409)."""
    banner: str = ""                  # greeting text after the host name
    hostname: str = ""                # our name in the greeting and EHLO ("" = the host's)
    preauth_timeout: float = 300.0    # RFC 5321 §4.5.3.2.7: a server waits 5 minutes
    login_deadline: float = 600.0     # total seconds for the whole dialogue before AUTH
    idle_timeout: float = 600.0       # after login; RFC 5321 §4.5.3.2.6: 10 min for DATA's end
    max_message_size: int = 52428800  # EHLO SIZE (RFC 1870); larger messages get 552 5.3.4
    relay: str = ""                   # "host:port": one submission server for every mailbox
    relay_xclient_login: bool = False  # the relay takes XCLIENT LOGIN= from us (no AUTH)

    @property
    def relay_backend(self) -> "BackendConfig | None":
        """The [submission] relay as a back-end, or None for per-mailbox routing."""
        if not self.relay:
            return None
        host, port = split_address(self.relay)
        return BackendConfig(name="submission-relay", address=host, submission_port=port,
                             submission_xclient_login=self.relay_xclient_login)


@dataclass(frozen=True)
class BackendConfig:
    name: str = ""
    address: str = ""
    imap_port: int = 143
    pop3_port: int = 110
    submission_port: int = 587
    submission_xclient_login: bool = False   # trusts our XCLIENT LOGIN=: no AUTH replayed
    tls: str = "none"                  # "none" | "starttls" | "implicit"
    tls_ca_file: str = ""              # CA bundle the back-end's certificate is checked against
    tls_verify_name: str = ""          # name its certificate must carry ("" = address)
    connect_timeout: float = 5.0       # connect + greeting
    login_timeout: float = 15.0        # login command answered

    def port(self, protocol: str) -> int:
        return {"imap": self.imap_port, "pop3": self.pop3_port,
                "submission": self.submission_port}[protocol]


@dataclass(frozen=True)
class DirectoryConfig:
    source: str = "export"            # "export" | "ldap"
    default_domain: str = ""          # appended to login names without "@"
    netbios_domain: str = ""          # "CORP": sAMAccountName x also logs in as CORP\x
    miss: str = ""                    # cache miss: "read-through" (ldap) | "unknown" | "unavailable"
    negative_ttl: int = 60            # seconds a read-through "no such user" is cached
    sync_interval: float = 0.0        # master runs an incremental sync this often (0 = never)
    lookup_timeout: float = 2.0       # bound of one read-through lookup
    ldap_url: str = ""                # ldap://host[:port] or ldaps://host[:port]
    ldap_bind_dn: str = ""            # empty: anonymous
    ldap_password: str = ""
    ldap_base: str = ""
    ldap_filter: str = "(objectClass=*)"
    ldap_start_tls: bool = False
    ldap_ca_file: str = ""            # CA bundle for ldaps:// and StartTLS ("" = system CAs)
    ldap_page_size: int = 500         # paged results (Active Directory: at most 1000)
    ldap_timeout: float = 30.0        # connect and per-response bound of the sync jobs
    ldap_change_attribute: str = "modifyTimestamp"   # incremental mark; AD: "uSNChanged"
    login_attributes: tuple[str, ...] = ("uid", "mail")
    backend_attribute: str = "mailHost"               # AD: "msExchHomeServerName"
    backend_login_attribute: str = ""
    id_attribute: str = "entryUUID"                   # AD: "objectGUID"

    @property
    def read_through(self) -> bool:
        return self.miss == "read-through"


@dataclass(frozen=True)
class ReferralConfig:
    follow: bool = True                   # follow RFC 2221/2193 referrals for the client
    allow_backends: bool = True           # the hosts of [backends] may be referred to
    allowed_hosts: tuple[str, ...] = ()   # more hosts, as shell patterns ("*.mail.example.com")
    max_hops: int = 3                     # login referrals followed in a row
    pass_to_capable_clients: bool = False  # a client that uses RLIST/RLSUB sees referrals itself
    connect_timeout: float = 5.0          # for referred hosts that are not [backends]
    login_timeout: float = 15.0
    home_keepalive: float = 300.0         # NOOP a back-end link unused this long (mailbox referrals)


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    listen: tuple[ListenConfig, ...]
    tls: TLSConfig
    redis: RedisConfig
    imap: ProtocolConfig
    pop3: ProtocolConfig
    backends: dict[str, BackendConfig]
    directory: DirectoryConfig
    referrals: ReferralConfig = ReferralConfig()
    limits: LimitsConfig = LimitsConfig()
    submission: SubmissionConfig = SubmissionConfig()

    def backend(self, name: str) -> BackendConfig | None:
        """The [backends.NAME] entry for a directory back-end value (name or address)."""
        if name in self.backends:
            return self.backends[name]
        lowered = name.lower()
        for backend in self.backends.values():
            if backend.name.lower() == lowered or backend.address.lower() == lowered:
                return backend
        return None


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" → (host, port); ValueError on anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Range:
    """The sane values of one numeric key: ``low <= value <= high`` (or exactly 0 when
    ``zero`` names what 0 means); ``why`` ends the error message."""
    low: float
    high: float
    why: str
    zero: str = ""
    unit: str = ""

    def check(self, value) -> str | None:
        """None when ``value`` is sane, else the reason for the error message."""
        if value == 0 and self.zero:
            return None
        if self.low <= value <= self.high:
            return None
        unit = f" {self.unit}" if self.unit else ""
        zero = f" (or 0: {self.zero})" if self.zero else ""
        why = f": {self.why}" if self.why else ""
        return f"must be between {_number(self.low)} and {_number(self.high)}{unit}{zero}{why}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


LOGIN_DEADLINE_RANGE = (1.0, 3600.0)
_PORT = Range(1, 65535, "a TCP port number")
_NETWORK_TIMEOUT = Range(0.1, 600, "seconds; 0 would fail every attempt at once, more than "
                                   "10 minutes holds a client with no answer")
# Every numeric key of every table, reviewed (issue 12: heartbeat_timeout = 0 made the master
# fork thousands of workers a second).  A numeric field missing here is a test failure.
RANGES: dict[type, dict[str, Range]] = {
    ServerConfig: {
        "workers": Range(1, 1024, "worker processes; more than 1024 on one host is a typo",
                         zero="one per CPU"),
        "graceful_timeout": Range(0, 86400, "seconds sessions get to finish on TERM/HUP"),
        "max_connections": Range(1, 1_000_000, "open sessions per worker (each needs a file "
                                               "descriptor or two)"),
        "heartbeat_timeout": Range(1, 3600, "seconds; workers beat every quarter of it, below "
                                            "1 s a busy worker is killed and replaced in a loop"),
        "auth_failure_delay": Range(0, 60, "seconds; longer holds every client of a typo"),
        "status_interval": Range(0.1, 3600, "seconds between rewrites of the status file"),
        "drain_delay": Range(0, 600, "seconds /healthz says 503 before a TERM stops accepting; "
                                     "longer than a balancer needs only delays the stop"),
    },
    TLSConfig: {
        "session_lifetime": Range(0, 86400, "seconds a TLS session may be resumed (0 = not "
                                            "at all)"),
        "handshake_timeout": Range(0.1, 300, "seconds the whole handshake may take; each one "
                                             "holds a connection slot"),
    },
    RedisConfig: {
        "timeout": Range(0.01, 60, "seconds a lookup may wait: logins wait that long "
                                   "when Redis is gone"),
        "db": Range(0, 65535, "a Redis database index"),
    },
    LimitsConfig: {
        "max_connections_per_address": Range(1, 1_000_000, "logged-in sessions of one client "
                                                           "address", zero="no limit"),
        "max_connections_per_login": Range(1, 1_000_000, "logged-in sessions of one login",
                                           zero="no limit"),
        "session_ttl": Range(1, 86400, "seconds a session's count lives unless refreshed"),
        "auth_failures_per_address": Range(1, 1_000_000, "failed logins from one address",
                                           zero="no limit"),
        "auth_failures_per_login": Range(1, 1_000_000, "failed logins of one login from one "
                                                       "address", zero="no limit"),
        "auth_failure_window": Range(1, 86400, "seconds failures are remembered"),
        "auth_failure_max_delay": Range(0, 300, "seconds; the growing delay stops there"),
        "ipv6_prefix": Range(16, 128, "leading bits of an IPv6 client address that are one "
                                      "client for the limits (64: one subscriber's network)"),
    },
    ProtocolConfig: {
        "preauth_timeout": Range(0.5, 3600, "idle seconds before login"),
        "idle_timeout": Range(0.5, 7 * 86400, "idle seconds after login"),
        "max_line": Range(1024, 16 << 20, "bytes; RFC 3501 clients send lines of 8000 "
                                          "octets, and a line is held in memory whole"),
        "max_login_literal": Range(256, 1 << 20, "bytes of one literal before login"),
        # below 1 s no login can finish, above an hour it no longer bounds a slowloris
        "login_deadline": Range(*LOGIN_DEADLINE_RANGE, "", unit="seconds"),
    },
    SubmissionConfig: {
        "preauth_timeout": Range(0.5, 3600, "idle seconds before AUTH"),
        "idle_timeout": Range(0.5, 7 * 86400, "idle seconds after AUTH"),
        "login_deadline": Range(*LOGIN_DEADLINE_RANGE, "", unit="seconds"),
        "max_message_size": Range(1024, 1 << 40, "bytes; the EHLO SIZE and the 552 bound"),
    },
    BackendConfig: {
        "imap_port": _PORT,
        "pop3_port": _PORT,
        "submission_port": _PORT,
        "connect_timeout": _NETWORK_TIMEOUT,
        "login_timeout": _NETWORK_TIMEOUT,
    },
    DirectoryConfig: {
        "negative_ttl": Range(0, 86400, "seconds a \"no such user\" is cached (0 = not at all)"),
        "sync_interval": Range(0.5, 7 * 86400, "seconds between incremental syncs",
                               zero="never"),
        "lookup_timeout": Range(0.05, 60, "seconds a read-through lookup may hold a login"),
        "ldap_page_size": Range(1, 100_000, "entries per LDAP page (Active Directory: at "
                                            "most 1000)"),
        "ldap_timeout": _NETWORK_TIMEOUT,
    },
    ReferralConfig: {
        "max_hops": Range(0, 10, "login referrals followed in a row (0 = none)"),
        "home_keepalive": Range(0.5, 1800, "seconds; a back-end's autologout comes after 30 "
                                           "minutes at the earliest (RFC 3501 §5.4), the NOOP "
                                           "must come sooner"),
        "connect_timeout": _NETWORK_TIMEOUT,
        "login_timeout": _NETWORK_TIMEOUT,
    },
}


class _Reader:
    """Checks one TOML table against a dataclass, naming file and key on every error."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {reason}")

    def table(self, cls, raw: Any, prefix: str, **extra):
        if not isinstance(raw, dict):
            raise self.fail(prefix, "must be a table")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(extra)
        for key, value in raw.items():
            if key not in fields or key in extra:
                raise self.fail(f"{prefix}.{key}", "unknown key")
            values[key] = self.value(fields[key], value, f"{prefix}.{key}")
            sane = RANGES.get(cls, {}).get(key)
            reason = sane.check(values[key]) if sane is not None else None
            if reason:
                raise self.fail(f"{prefix}.{key}", reason)
        return cls(**values)

    def value(self, fld: dataclasses.Field, value: Any, key: str):
        default = fld.default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise self.fail(key, "must be true or false")
            return value
        if isinstance(default, (int, float)):
            integer = isinstance(default, int)
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise self.fail(key, "must be an integer" if integer else "must be a number")
            value = type(default)(value)      # a float key takes 5 as 5.0
            if value < 0:
                raise self.fail(key, "must not be negative")
            return value
        if isinstance(default, str):
            if not isinstance(value, str):
                raise self.fail(key, "must be a string")
            return value
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(key, "must be a list of strings")
            return tuple(value)
        raise self.fail(key, "unsupported")  # pragma: no cover


def load(path: str) -> Config:
    """Read and validate a TOML config file; raises ConfigError."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse(raw, path)


def parse(raw: dict, path: str = "<config>") -> Config:
    """Validate an already-decoded TOML document."""
    reader = _Reader(path)
    known = {"server", "listen", "tls", "redis", "imap", "pop3", "backends", "directory",
             "referrals", "limits", "submission"}
    for key in raw:
        if key not in known:
            raise reader.fail(key, "unknown section")
    server = reader.table(ServerConfig, raw.get("server", {}), "server")
    if server.log_level not in ("debug", "info", "warning", "error"):
        raise reader.fail("server.log_level", "must be debug, info, warning or error")
    if server.log_format not in ("text", "json"):
        raise reader.fail("server.log_format", "must be \"text\" or \"json\"")
    listen = _listeners(reader, raw.get("listen", []))
    tls = _tls(reader, raw.get("tls", {}))
    if any(l.tls != "none" for l in listen) and not (tls.cert_file and tls.key_file):
        raise reader.fail("tls.cert_file", "TLS listeners need tls.cert_file and tls.key_file")
    redis = _redis(reader, raw.get("redis", {}))
    imap = reader.table(ProtocolConfig, raw.get("imap", {}), "imap")
    pop3 = reader.table(ProtocolConfig, raw.get("pop3", {}), "pop3")
    if "pop3" not in raw or "idle_timeout" not in raw.get("pop3", {}):
        pop3 = dataclasses.replace(pop3, idle_timeout=600.0)  # RFC 1939 §3: at least 10 minutes
    backends = _backends(reader, raw.get("backends", {}))
    directory = _directory(reader, raw.get("directory", {}))
    referrals = reader.table(ReferralConfig, raw.get("referrals", {}), "referrals")
    limits = _limits(reader, raw.get("limits", {}))
    submission = _submission(reader, raw.get("submission", {}))
    return Config(path, server, listen, tls, redis, imap, pop3, backends, directory, referrals,
                  limits, submission)


def _redis(reader: _Reader, raw: Any) -> RedisConfig:
    """[redis]: a URL, or Sentinels and a service name (not both)."""
    redis = reader.table(RedisConfig, raw, "redis")
    if redis.sentinels:
        if redis.url:
            raise reader.fail("redis.url", "use either url or sentinels, not both")
        if not redis.service_name:
            raise reader.fail("redis.service_name", "is required with redis.sentinels")
        for index, address in enumerate(redis.sentinels):
            try:
                split_address(address)
            except ValueError as exc:
                raise reader.fail(f"redis.sentinels[{index}]", str(exc)) from None
    elif redis.service_name:
        raise reader.fail("redis.sentinels", "redis.service_name needs a list of sentinels")
    if redis.timeout <= 0:
        raise reader.fail("redis.timeout", "must be above 0")
    return redis


def _limits(reader: _Reader, raw: Any) -> LimitsConfig:
    import ipaddress
    limits = reader.table(LimitsConfig, raw, "limits")
    for index, network in enumerate(limits.trusted_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise reader.fail(f"limits.trusted_networks[{index}]", str(exc)) from None
    return limits


def _submission(reader: _Reader, raw: Any) -> SubmissionConfig:
    """[submission]; its numbers are checked by RANGES."""
    submission = reader.table(SubmissionConfig, raw, "submission")
    if submission.relay:
        try:
            split_address(submission.relay)
        except ValueError as exc:
            raise reader.fail("submission.relay", str(exc)) from None
    if submission.relay_xclient_login and not submission.relay:
        raise reader.fail("submission.relay_xclient_login", "needs submission.relay")
    if any(ch in submission.hostname for ch in " \t\r\n"):
        raise reader.fail("submission.hostname", "must be one host name")
    return submission


DIRECTORY_MISS = ("read-through", "unknown", "unavailable")
CHANGE_ATTRIBUTES = ("modifyTimestamp", "uSNChanged")


def _directory(reader: _Reader, raw: Any) -> DirectoryConfig:
    """[directory]; ``miss`` defaults to "read-through" for LDAP, "unknown" for exports."""
    directory = reader.table(DirectoryConfig, raw, "directory")
    if directory.source not in ("export", "ldap"):
        raise reader.fail("directory.source", "must be \"export\" or \"ldap\"")
    if not directory.miss:
        directory = dataclasses.replace(
            directory, miss="read-through" if directory.source == "ldap" else "unknown")
    if directory.miss not in DIRECTORY_MISS:
        raise reader.fail("directory.miss", "must be \"read-through\", \"unknown\" or "
                                            "\"unavailable\"")
    if directory.miss == "read-through" and directory.source != "ldap":
        raise reader.fail("directory.miss", "\"read-through\" needs source = \"ldap\"")
    if not directory.login_attributes:
        raise reader.fail("directory.login_attributes", "must name at least one attribute")
    if not directory.backend_attribute:
        raise reader.fail("directory.backend_attribute", "is required")
    if directory.ldap_change_attribute.lower() not in (a.lower() for a in CHANGE_ATTRIBUTES):
        raise reader.fail("directory.ldap_change_attribute",
                          f"must be one of {', '.join(CHANGE_ATTRIBUTES)}")
    if directory.source == "ldap":
        _check_ldap(reader, directory)
    return directory


def _check_ldap(reader: _Reader, directory: DirectoryConfig) -> None:
    scheme = directory.ldap_url.partition("://")[0].lower()
    if scheme not in ("ldap", "ldaps") or not directory.ldap_url.partition("://")[2]:
        raise reader.fail("directory.ldap_url", "source = \"ldap\" needs ldap://HOST[:PORT] "
                                                "or ldaps://HOST[:PORT]")
    if scheme == "ldaps" and directory.ldap_start_tls:
        raise reader.fail("directory.ldap_start_tls", "is for ldap:// URLs; ldaps:// is TLS already")
    if not directory.ldap_base:
        raise reader.fail("directory.ldap_base", "is required with source = \"ldap\"")


def _tls(reader: _Reader, raw: Any) -> TLSConfig:
    """[tls] with its [[tls.certificates]] array (SNI)."""
    if not isinstance(raw, dict):
        raise reader.fail("tls", "must be a table")
    raw = dict(raw)
    extra = raw.pop("certificates", [])
    if not isinstance(extra, list):
        raise reader.fail("tls.certificates", "must be an array of tables ([[tls.certificates]])")
    certificates = []
    for index, entry in enumerate(extra):
        key = f"tls.certificates[{index}]"
        cert = reader.table(CertificateConfig, entry, key)
        if not (cert.cert_file and cert.key_file):
            raise reader.fail(f"{key}.cert_file", "cert_file and key_file are required")
        if not cert.server_names:
            raise reader.fail(f"{key}.server_names", "name at least one SNI host name")
        certificates.append(cert)
    tls = reader.table(TLSConfig, raw, "tls", certificates=tuple(certificates))
    if tls.min_version not in ("1.2", "1.3"):
        raise reader.fail("tls.min_version", "must be \"1.2\" or \"1.3\"")
    if certificates and not tls.cert_file:
        raise reader.fail("tls.cert_file", "[[tls.certificates]] need a default certificate")
    return tls


def is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _listeners(reader: _Reader, raw: Any) -> tuple[ListenConfig, ...]:
    if not isinstance(raw, list):
        raise reader.fail("listen", "must be an array of tables ([[listen]])")
    result, seen = [], set()
    for index, entry in enumerate(raw):
        key = f"listen[{index}]"
        listener = reader.table(ListenConfig, entry, key)
        if listener.protocol not in PROTOCOLS:
            raise reader.fail(f"{key}.protocol", f"must be one of {', '.join(PROTOCOLS)}")
        if listener.tls not in TLS_MODES:
            raise reader.fail(f"{key}.tls", f"must be one of {', '.join(TLS_MODES)}")
        try:
            host_port = listener.host_port
        except ValueError as exc:
            raise reader.fail(f"{key}.address", str(exc)) from None
        listener = _listener_policy(reader, key, listener,
                                    isinstance(entry, dict) and "require_tls_for_login" in entry)
        if host_port in seen:
            raise reader.fail(f"{key}.address", "listed twice")
        seen.add(host_port)
        result.append(listener)
    if not result:
        raise reader.fail("listen", "at least one [[listen]] entry is needed")
    return tuple(result)


def _listener_policy(reader: _Reader, key: str, listener: ListenConfig,
                     explicit_require: bool) -> ListenConfig:
    """Defaults and combinations that depend on other keys of the same listener."""
    import ipaddress
    if not explicit_require and listener.protocol != "health":
        listener = dataclasses.replace(
            listener, require_tls_for_login=not is_loopback(listener.host_port[0]))
    if listener.protocol == "health":
        if listener.tls != "none":
            raise reader.fail(f"{key}.tls", "the health listener is plain HTTP")
        if listener.proxy_protocol:
            raise reader.fail(f"{key}.proxy_protocol", "not supported on the health listener")
        if explicit_require and listener.require_tls_for_login:
            raise reader.fail(f"{key}.require_tls_for_login", "the health listener has no login")
    elif listener.tls == "none" and listener.require_tls_for_login:
        why = "is on" if explicit_require else "defaults to true off loopback"
        raise reader.fail(f"{key}.require_tls_for_login",
                          f"{why} but tls = \"none\": no login could ever succeed; "
                          "set tls, or require_tls_for_login = false")
    for cidr in listener.proxy_trusted:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise reader.fail(f"{key}.proxy_trusted", f"{cidr!r} is not a CIDR") from None
    return listener


def _backends(reader: _Reader, raw: Any) -> dict[str, BackendConfig]:
    if not isinstance(raw, dict):
        raise reader.fail("backends", "must be a table of [backends.NAME] tables")
    result = {}
    for name, entry in raw.items():
        key = f"backends.{name}"
        backend = reader.table(BackendConfig, entry, key, name=name)
        if not backend.address:
            raise reader.fail(f"{key}.address", "is required")
        if backend.tls not in TLS_MODES:
            raise reader.fail(f"{key}.tls", f"must be one of {', '.join(TLS_MODES)}")
        if backend.tls == "none" and (backend.tls_ca_file or backend.tls_verify_name):
            raise reader.fail(f"{key}.tls_ca_file", "needs tls = \"starttls\" or \"implicit\"")
        result[name] = backend
    return result
