"""The servers of one bench run: Dovecot, Redis, the gateway, nginx + auth_http.

``Stack`` starts them in temporary folders on loopback ports and stops every one of them
when its ``with`` block ends, however it ends.  ``targets`` names where a client connects:
direct (Dovecot), mailgate and nginx, all three in front of the same Dovecot.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import servers  # tests/servers.py (on sys.path, see bench/__init__.py)

from bench import nginx, procstats

BACKEND = "bench"
FETCH_SIZES = {"fetch10": 10 * 1024 * 1024, "fetch20": 20 * 1000 * 1000}

# Dovecot tuned the way a back-end behind a proxy is: login and mail processes reused
# (performance mode; all bench users share one uid), enough imap processes and per-user
# connections for the 1,000 idle sessions.  verbose_proctitle shows which processes are
# serving a user (Stack.backend_sessions).
DOVECOT_TUNING = """\
verbose_proctitle = yes
default_process_limit = 3000
default_client_limit = 6000
protocol imap {
  mail_max_userip_connections = 10000
}
service imap-login {
  service_count = 0
  process_min_avail = 2
  client_limit = 3000
}
service imap {
  process_limit = 3000
  process_min_avail = 4
  service_count = 0
}
"""


@dataclass
class Target:
    """Where the bench's clients connect, and which processes are the proxy (none: direct)."""
    name: str
    host: str
    port: int
    proxy_pgid: int | None = None        # the proxy's process group (CPU, memory)
    helper_pgid: int | None = None       # its lookup service: Redis or auth_http
    notes: list[str] = field(default_factory=list)

    def proxy_pids(self) -> list[int]:
        return procstats.process_group(self.proxy_pgid) if self.proxy_pgid else []

    def helper_pids(self) -> list[int]:
        return procstats.process_group(self.helper_pgid) if self.helper_pgid else []


def users(count: int) -> dict[str, str]:
    """The session users plus one mailbox per big-FETCH size."""
    logins = {f"user{i}@bench.test": f"secret-{i}" for i in range(count)}
    logins.update({f"{name}@bench.test": f"secret-{name}" for name in FETCH_SIZES})
    return logins


def big_message(size: int) -> bytes:
    """A plain-text message of exactly ``size`` bytes, CRLF line ends (Dovecot sends as is)."""
    head = (b"From: bench@bench.test\r\nTo: fetch@bench.test\r\nSubject: bench %d bytes\r\n"
            b"Message-ID: <bench-%d@bench.test>\r\n\r\n" % (size, size))
    line = b"x" * 76 + b"\r\n"
    body_size = size - len(head)
    body = line * (body_size // len(line))
    body += b"y" * (body_size - len(body))
    return head + body


class Stack(contextlib.ExitStack):
    """All servers of a run; ``with Stack(...) as stack`` starts them, leaving stops them."""

    def __init__(self, user_count: int, target_names, gateway_log_level: str = "info",
                 keep: bool = False):
        super().__init__()
        self.user_count = user_count
        self.target_names = tuple(target_names)
        self.gateway_log_level = gateway_log_level
        self.keep = keep
        self.users = users(user_count)
        self.session_users = [(u, p) for u, p in self.users.items() if u.startswith("user")]
        self.tmpdir: Path | None = None
        self.targets: dict[str, Target] = {}
        self.dovecot = None

    def __enter__(self) -> "Stack":
        super().__enter__()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _tmp(self, name: str) -> Path:
        path = self.tmpdir / name
        path.mkdir()
        return path

    def _start(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
        if not self.keep:
            self.callback(shutil.rmtree, self.tmpdir, True)
        dovecot = servers.Dovecot(self._tmp("dovecot"), "bench", self.users,
                                  extra_conf=DOVECOT_TUNING)
        self.dovecot = self.enter_context(dovecot)
        for name, size in FETCH_SIZES.items():
            dovecot.deliver(f"{name}@bench.test", big_message(size))
        self.targets["direct"] = Target("direct", dovecot.host, dovecot.imap_port)
        if "mailgate" in self.target_names:
            self._start_mailgate()
        if "nginx" in self.target_names:
            self._start_nginx()

    def _start_mailgate(self) -> None:
        dovecot = self.dovecot
        redis = self.enter_context(servers.RedisServer(self._tmp("redis")))
        gateway = servers.GatewayProcess(
            self._tmp("gateway"), backends={BACKEND: (dovecot.host, dovecot.imap_port,
                                                      dovecot.pop3_port)},
            redis_url=redis.url, workers=2, protocols=("imap",),
            server_overrides={"log_level": self.gateway_log_level})
        self.enter_context(gateway)
        gateway.route({login: BACKEND for login in self.users})
        self.targets["mailgate"] = Target(
            "mailgate", gateway.host, gateway.imap_port, gateway.pid, redis.pid,
            [f"2 workers, log_level={self.gateway_log_level}"])

    def _start_nginx(self) -> None:
        dovecot = self.dovecot
        auth = self.enter_context(nginx.AuthHttp(self._tmp("auth_http"), dovecot.host,
                                                 dovecot.imap_port))
        proxy = self.enter_context(nginx.NginxMailProxy(self._tmp("nginx"), auth.port))
        self.targets["nginx"] = Target("nginx", proxy.host, proxy.imap_port, proxy.pid,
                                       auth.pid, ["worker_processes 2, proxy_buffer default"])

    def dovecot_pids(self) -> list[int]:
        return procstats.process_group(self.dovecot.pid)

    def backend_sessions(self) -> int:
        """Dovecot mail processes serving a user now (verbose_proctitle names the user)."""
        return sum("@bench.test " in servers._cmdline(pid) for pid in self.dovecot_pids())

    def wait_backend_idle(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until Dovecot has finished with every earlier client's session."""
        deadline = time.monotonic() + timeout
        while self.backend_sessions():
            if time.monotonic() > deadline:
                print(f"[bench] Dovecot still serves {self.backend_sessions()} sessions after "
                      f"{timeout:g} s; going on", file=sys.stderr, flush=True)
                return
            time.sleep(0.1)
