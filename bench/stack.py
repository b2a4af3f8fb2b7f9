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
INBOX_MESSAGES = 10        # small messages in each session user's INBOX
FETCH_SIZES = {"fetch10": 10 * 1024 * 1024}

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
protocol pop3 {
  mail_max_userip_connections = 10000
}
service pop3-login {
  service_count = 0
  process_min_avail = 2
  client_limit = 3000
}
service pop3 {
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
    pop3_port: int
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


def small_message(number: int) -> bytes:
    return (b"From: bench@bench.test\r\nTo: user@bench.test\r\nSubject: note %d\r\n"
            b"Message-ID: <note-%d@bench.test>\r\n\r\n" % (number, number)) + b"text\r\n" * 40


class Stack(contextlib.ExitStack):
    """All servers of a run; ``with Stack(...) as stack`` starts them, leaving stops them."""

    def __init__(self, user_count: int, target_names, gateway_log_level: str = "info",
                 keep: bool = False, workers: int = 2):
        super().__init__()
        self.workers = workers
        self.proxies: contextlib.ExitStack | None = None
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
        for login, _ in self.session_users:       # what FETCH 1:* (FLAGS RFC822.SIZE) lists
            for number in range(INBOX_MESSAGES):
                dovecot.deliver(login, small_message(number))
        self.targets["direct"] = Target("direct", dovecot.host, dovecot.imap_port,
                                        dovecot.pop3_port)
        self.callback(self.stop_proxies)
        self.start_proxies(self.workers)

    def start_proxies(self, workers: int) -> None:
        """(Re)start mailgate and nginx with ``workers`` worker processes each."""
        self.stop_proxies()
        self.workers = workers
        self.proxies = contextlib.ExitStack()
        self.proxies.__enter__()
        if "mailgate" in self.target_names:
            self._start_mailgate()
        if "nginx" in self.target_names:
            self._start_nginx()

    def stop_proxies(self) -> None:
        if self.proxies is not None:
            proxies, self.proxies = self.proxies, None
            proxies.close()
            for name in ("mailgate", "nginx"):
                self.targets.pop(name, None)

    def _tmp_fresh(self, name: str) -> Path:
        return self._tmp(f"{name}-{self.workers}w-{time.monotonic_ns()}")

    def _start_mailgate(self) -> None:
        dovecot = self.dovecot
        redis = self.proxies.enter_context(servers.RedisServer(self._tmp_fresh("redis")))
        gateway = servers.GatewayProcess(
            self._tmp_fresh("gateway"), backends={BACKEND: (dovecot.host, dovecot.imap_port,
                                                            dovecot.pop3_port)},
            redis_url=redis.url, workers=self.workers, protocols=("imap", "pop3"),
            server_overrides={"log_level": self.gateway_log_level})
        self.proxies.enter_context(gateway)
        gateway.route({login: BACKEND for login in self.users})
        self.targets["mailgate"] = Target(
            "mailgate", gateway.host, gateway.imap_port, gateway.pop3_port, gateway.pid,
            redis.pid, [f"{self.workers} workers, log_level={self.gateway_log_level}"])

    def _start_nginx(self) -> None:
        dovecot = self.dovecot
        auth = self.proxies.enter_context(nginx.AuthHttp(
            self._tmp_fresh("auth_http"), dovecot.host, dovecot.imap_port, dovecot.pop3_port))
        proxy = self.proxies.enter_context(nginx.NginxMailProxy(
            self._tmp_fresh("nginx"), auth.port, self.workers))
        self.targets["nginx"] = Target(
            "nginx", proxy.host, proxy.imap_port, proxy.pop3_port, proxy.pid, auth.pid,
            [f"worker_processes {self.workers}, proxy_buffer default"])

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
