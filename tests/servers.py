"""Real servers for the test suite: Redis, Dovecot and the gateway itself.

Each server runs on free loopback ports in its own temporary folder, in its own process group,
and ``stop()`` always leaves nothing behind (TERM, then KILL of the whole group).  Anything still
running when the interpreter exits is stopped by an ``atexit`` hook, so an interrupted test run
does not leak daemons.  No pytest import: the benchmarks use this module too.
"""
from __future__ import annotations

import atexit
import csv
import grp
import imaplib
import itertools
import json
import os
import poplib
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_running: set = set()   # servers started and not yet stopped, for the atexit hook


_handed_out: set = set()   # ports free_port() returned in this process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that no earlier call
    in this process returned: the kernel may offer the same free port twice in a row, and
    two listeners of one gateway (or a gateway and its back-end) must never get the same."""
    held = []
    try:
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)      # kept bound while we look: the kernel offers another
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    finally:
        for sock in held:
            sock.close()


def wait_for_port(host: str, port: int, timeout: float = 10.0, process=None) -> None:
    """Return once host:port accepts a TCP connection; TimeoutError after ``timeout``.

    With ``process`` (a Popen), a RuntimeError is raised as soon as it exits.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode} "
                               f"before {host}:{port} accepted connections")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} did not accept a connection "
                                   f"within {timeout}s") from None
            time.sleep(0.02)


def find_binary(name: str) -> str | None:
    """The path of an executable, also looking in sbin folders a non-root PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} is unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def _pids_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields and fields[2] == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _proc_stat(pid: int) -> tuple[str, int, int, str] | None:
    """(state, ppid, pgrp, comm) of a process from /proc/PID/stat, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2]), comm


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _Process:
    """A child started in its own session; stop() ends the whole process group."""

    name = "server"
    signal_group = False   # stop() signals the whole process group, not only the main pid

    def __init__(self, tmpdir):
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.leftover_pids: list[int] = []   # group members still alive after the main pid exited

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self, argv, log_path: Path, **kwargs) -> None:
        with open(log_path, "ab") as log:
            # A file, not a pipe: daemons keep inherited descriptors open for ever.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            **kwargs)
        _running.add(self)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` to the main process, wait, then SIGKILL whatever is left of the group.

        Returns the main process's exit code (negative: killed by that signal).
        """
        proc = self.process
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                try:
                    if self.signal_group:
                        os.killpg(proc.pid, sig)
                    else:
                        proc.send_signal(sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill_group(proc.pid)
                    proc.wait(10)
            grace = time.monotonic() + 1   # children that got the signal too are still exiting
            while _pids_in_group(proc.pid) and time.monotonic() < grace:
                time.sleep(0.02)
            self.leftover_pids = _pids_in_group(proc.pid)
            self._kill_group(proc.pid)
        finally:
            _running.discard(self)
        return proc.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 10
        while _pids_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _await_ports(self, ports, what: str, details, timeout: float = 10.0) -> None:
        """Wait until every port accepts a connection; otherwise stop the process and raise
        a RuntimeError naming ``what`` with ``details()`` (its log)."""
        deadline = time.monotonic() + timeout
        try:
            for port in ports:
                wait_for_port(self.host, port, max(0.1, deadline - time.monotonic()),
                              self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.stop(timeout=5)
            raise RuntimeError(f"{what} did not start: {exc}\n{details()}") from exc

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError


@atexit.register
def _stop_everything() -> None:
    for server in list(_running):
        try:
            server.stop(timeout=5)
        except Exception:   # noqa: BLE001 - best effort at interpreter exit
            pass


class RedisServer(_Process):
    """A private redis-server on a free loopback port, without persistence."""

    name = "redis"
    DATABASES = 512       # one per gateway a test run makes (the whole suite makes >100)

    def __init__(self, tmpdir):
        super().__init__(tmpdir)
        self.host = LOOPBACK
        self.port = 0
        self._next_db = itertools.count(1)   # db 0 is .url; allocate_db() hands out the rest

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def url_for_db(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def allocate_db(self) -> str:
        """The URL of a database index no other caller got; it is flushed first."""
        db = next(self._next_db)
        if db >= self.DATABASES:
            raise RuntimeError(f"more than {self.DATABASES - 1} Redis databases allocated")
        with self.client(db) as client:
            client.flushdb()
        return self.url_for_db(db)

    def client(self, db: int = 0):
        import redis
        return redis.Redis(host=self.host, port=self.port, db=db, socket_timeout=5)

    def log_text(self) -> str:
        return (self.tmpdir / "redis.log").read_text(errors="replace")

    def start(self) -> "RedisServer":
        binary = find_binary("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = self.port or free_port()   # a restart keeps the port (fault tests)
        conf = self.tmpdir / "redis.conf"
        conf.write_text("\n".join([
            f"port {self.port}",
            f"bind {self.host}",
            f"dir {self.tmpdir}",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"databases {self.DATABASES}",
            f"logfile {self.tmpdir / 'redis.log'}",
            "",
        ]))
        self._spawn([binary, str(conf)], self.tmpdir / "redis.stdout")
        try:
            wait_for_port(self.host, self.port, 10, self.process)
            with self.client() as client:
                client.ping()
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"redis-server did not start: {exc}\n"
                               f"{_tail(self.tmpdir / 'redis.log')}") from exc
        return self


class Dovecot(_Process):
    """A real Dovecot with passwd-file users, Maildir storage, IMAP and POP3 on loopback.

    ``users`` maps login → plaintext password.  ``passdb_extra`` / ``userdb_extra`` map a
    login to extra passwd-file fields ("nologin=y host=10.0.0.1 proxy_maybe=y"); userdb fields
    get the ``userdb_`` prefix they need.  ``extra_conf`` is appended to dovecot.conf.

    Runtime files live in a fresh 0755 folder under /tmp (``.root``): Dovecot's unprivileged
    processes must traverse it, and pytest's own temporary folders are 0700.  ``tmpdir`` gets a
    symlink to it and, after stop(), copies of the logs.
    """

    name = "dovecot"
    signal_group = True   # TERM to the master alone makes it wait ~1 s for its children

    def __init__(self, tmpdir, name: str, users: dict[str, str], *, extra_conf: str = "",
                 passdb_extra: dict[str, str] | None = None,
                 userdb_extra: dict[str, str] | None = None,
                 ssl_files: tuple | None = None,
                 submission_relay: tuple[str, int] | None = None):
        super().__init__(tmpdir)
        self.name = name
        self.ssl_files = ssl_files      # (cert, key): ssl = yes, STARTTLS and imaps/pop3s
        self.imaps_port = 0
        self.pop3s_port = 0
        # Dovecot's submission service relays to this MTA (host, port); None: no submission.
        self.submission_relay = submission_relay
        self.users = dict(users)
        self.extra_conf = extra_conf
        self.passdb_extra = dict(passdb_extra or {})
        self.userdb_extra = dict(userdb_extra or {})
        for login, password in self.users.items():
            for text in (login, password, self.passdb_extra.get(login, ""),
                         self.userdb_extra.get(login, "")):
                if ":" in text or "\n" in text or "\r" in text:
                    raise ValueError(f"passwd-file fields cannot hold ':' or newlines: {text!r}")
        self.host = LOOPBACK
        self.imap_port = 0
        self.pop3_port = 0
        self.submission_port = 0
        self.root: Path | None = None
        self._seq = itertools.count()
        if os.geteuid() == 0:
            # Dovecot refuses uid 0 for mail; nobody exists everywhere.
            self.mail_user = "nobody"
            self.mail_group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
            self.internal_user, self.login_user = "dovecot", "dovenull"
        else:
            self.mail_user = pwd.getpwuid(os.getuid()).pw_name
            self.mail_group = grp.getgrgid(os.getgid()).gr_name
            self.internal_user = self.login_user = self.mail_user
        self.mail_uid = pwd.getpwnam(self.mail_user).pw_uid
        self.mail_gid = grp.getgrnam(self.mail_group).gr_gid

    # -- files ------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    def home(self, user: str) -> Path:
        return self.root / "mail" / user

    def maildir(self, user: str) -> Path:
        return self.home(user) / "Maildir"

    def _passwd_file(self) -> str:
        lines = []
        for login, password in self.users.items():
            extra = self.passdb_extra.get(login, "").split()
            extra += [f if f.startswith("userdb_") else f"userdb_{f}"
                      for f in self.userdb_extra.get(login, "").split()]
            lines.append(f"{login}:{{PLAIN}}{password}::::::{' '.join(extra)}")
        return "\n".join(lines) + "\n"

    def _config(self) -> str:
        root = self.root
        not_root = os.geteuid() != 0
        no_chroot = "  chroot =\n" if not_root else ""
        return f"""\
# Written by tests/servers.py for the {self.name!r} test back-end.
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailgate-test-{self.name}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.info.log
debug_log_path = {root}/dovecot.info.log
protocols = imap pop3{" submission" if self.submission_relay else ""}
listen = {self.host}
{self._ssl_config()}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_cache_size = 0
# Wrong passwords are tested on purpose, all from 127.0.0.1: no failure delay, no penalty
# (a failure is still answered on Dovecot's next 0.5 s auth-failure tick).
auth_failure_delay = 0
auth_verbose = yes
mail_debug = no
mail_max_userip_connections = 1000
login_trusted_networks = 127.0.0.0/8
imap_id_retain = yes
pop3_uidl_format = %08Xu%08Xv
mail_location = maildir:~/Maildir
default_internal_user = {self.internal_user}
default_internal_group = {self.mail_group if not_root else "dovecot"}
default_login_user = {self.login_user}
first_valid_uid = {min(self.mail_uid, 500) if self.mail_uid else 1}
first_valid_gid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
  default_fields = uid={self.mail_uid} gid={self.mail_gid} home={root}/mail/%u
}}
service imap-login {{
{no_chroot}  inet_listener imap {{
    address = {self.host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.imaps_port}
  }}
}}
service pop3-login {{
{no_chroot}  inet_listener pop3 {{
    address = {self.host}
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = {self.host}
    port = {self.pop3s_port}
  }}
}}
{self._submission_config(no_chroot)}service anvil {{
{no_chroot}  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{self.extra_conf}
"""

    def _ssl_config(self) -> str:
        if not self.ssl_files:
            return "ssl = no"
        folder = self.root / "ssl"
        folder.mkdir(exist_ok=True)
        for source, target in zip(self.ssl_files, ("cert.pem", "key.pem")):
            shutil.copy(source, folder / target)
        return (f"ssl = yes\nssl_cert = <{folder / 'cert.pem'}\n"
                f"ssl_key = <{folder / 'key.pem'}\nssl_min_protocol = TLSv1.2")

    def _submission_config(self, no_chroot: str) -> str:
        """Dovecot's submission service (RFC 6409) relaying to ``submission_relay``; it
        trusts the relay (XCLIENT with the client's address goes on to the MTA)."""
        if not self.submission_relay:
            return ""
        host, port = self.submission_relay
        return f"""\
hostname = {self.name.lower()}.mailgate.test
submission_relay_host = {host}
submission_relay_port = {port}
submission_relay_trusted = yes
service submission-login {{
{no_chroot}  inet_listener submission {{
    address = {self.host}
    port = {self.submission_port}
  }}
}}
"""

    def _make_dir(self, path: Path) -> None:
        """mkdir -p, with every created folder owned by the mail user."""
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for folder in reversed(missing):
            folder.mkdir(mode=0o700)
            os.chown(folder, self.mail_uid, self.mail_gid)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "Dovecot":
        binary = find_binary("dovecot")
        if binary is None:
            raise FileNotFoundError("dovecot is not installed")
        self.root = Path(tempfile.mkdtemp(prefix=f"mailgate-dovecot-{self.name}-", dir="/tmp"))
        self.root.chmod(0o755)
        link = self.tmpdir / f"dovecot-{self.name}"
        if not link.exists():
            link.symlink_to(self.root)
        # Ports may be chosen before start() (a referral to this server must name them).
        self.imap_port = self.imap_port or free_port()
        self.pop3_port = self.pop3_port or free_port()
        if self.ssl_files:
            self.imaps_port = self.imaps_port or free_port()
            self.pop3s_port = self.pop3s_port or free_port()
        if self.submission_relay:
            self.submission_port = self.submission_port or free_port()
        (self.root / "users").write_text(self._passwd_file())
        (self.root / "users").chmod(0o644)   # read by the auth process (default_internal_user)
        (self.root / "mail").mkdir(mode=0o755)
        os.chown(self.root / "mail", self.mail_uid, self.mail_gid)
        for login in self.users:
            self._make_dir(self.maildir(login))
        self.config_path.write_text(self._config())
        self._spawn([binary, "-F", "-c", str(self.config_path)], self.root / "dovecot.stderr")
        ports = (self.imap_port, self.pop3_port) + \
            ((self.imaps_port, self.pop3s_port) if self.ssl_files else ()) + \
            ((self.submission_port,) if self.submission_relay else ())
        self._await_ports(ports, f"dovecot {self.name}", self.log_text)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stop the master and every child; copy the logs into tmpdir; remove the root."""
        try:
            return super().stop(sig, timeout)
        finally:
            if self.root is not None and self.root.exists():
                for log in ("dovecot.log", "dovecot.info.log", "dovecot.stderr", "dovecot.conf"):
                    if (self.root / log).exists():
                        shutil.copy(self.root / log, self.tmpdir / f"{self.name}-{log}")
                shutil.rmtree(self.root, ignore_errors=True)
                link = self.tmpdir / f"dovecot-{self.name}"
                if link.is_symlink():
                    link.unlink()

    def log_text(self) -> str:
        """Everything Dovecot logged so far (error log, info log and the master's stderr)."""
        parts = []
        for log in ("dovecot.stderr", "dovecot.log", "dovecot.info.log"):
            for path in ((self.root / log) if self.root else None,
                         self.tmpdir / f"{self.name}-{log}"):
                if path is not None and path.exists():
                    parts.append(path.read_text(errors="replace"))
                    break
        return "".join(parts)

    # -- mail and clients -------------------------------------------------------------------

    def deliver(self, user: str, message: bytes, folder: str = "INBOX") -> Path:
        """Drop ``message`` into the user's Maildir new/ (tmp/ then rename, as Maildir asks)."""
        base = self.maildir(user)
        if folder.upper() != "INBOX":
            base = base / ("." + folder.replace("/", "."))   # Maildir++ layout
        for sub in ("cur", "new", "tmp"):
            self._make_dir(base / sub)
        unique = (f"{time.time_ns() // 1000}.P{os.getpid()}Q{next(self._seq)}"
                  f".mailgate-test")
        if isinstance(message, str):
            message = message.encode()
        staged = base / "tmp" / unique
        staged.write_bytes(message)
        os.chown(staged, self.mail_uid, self.mail_gid)
        os.chmod(staged, 0o600)
        final = base / "new" / unique
        os.rename(staged, final)
        return final

    def imap(self, user: str, password: str | None = None) -> imaplib.IMAP4:
        """An imaplib client logged in to this Dovecot directly (no gateway)."""
        password = self.users[user] if password is None else password
        client = imaplib.IMAP4(self.host, self.imap_port, timeout=10)
        try:
            if password.isascii():
                client.login(user, password)
            else:   # imaplib's LOGIN only sends ASCII
                secret = b"\0" + user.encode() + b"\0" + password.encode()
                client.authenticate("PLAIN", lambda _challenge: secret)
        except BaseException:
            client.shutdown()
            raise
        return client

    def pop3(self, user: str, password: str | None = None) -> poplib.POP3:
        """A poplib client logged in to this Dovecot directly (no gateway)."""
        password = self.users[user] if password is None else password
        client = poplib.POP3(self.host, self.pop3_port, timeout=10)
        try:
            client.user(user)
            client.pass_(password)
        except BaseException:
            client.close()
            raise
        return client


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)   # JSON's escapes are valid TOML
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(header: str, values: dict) -> str:
    lines = [header]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _server_keys() -> set[str]:
    """The [server] keys this checkout's gateway.config knows (it grows while we write tests)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    try:
        from gateway.config import ServerConfig
    except ImportError:
        return set()
    return set(ServerConfig.__dataclass_fields__)


class GatewayProcess(_Process):
    """``python -m gateway serve`` with a generated config, in its own session.

    ``backends`` maps a name to (host, imap_port, pop3_port) or to a dict of
    [backends.NAME] keys.  ``sections`` adds keys to (or adds) other top-level tables,
    e.g. ``{"directory": {"miss": "unavailable"}, "imap": {"preauth_timeout": 2}}``;
    ``extra_toml`` is appended verbatim (it must not repeat a generated table).
    ``listeners`` maps a name (the key of ``ports``) to [[listen]] keys, e.g.
    ``{"imaps": {"protocol": "imap", "tls": "implicit"}}``; the default is one plain
    listener per entry of ``protocols``.
    """

    name = "gateway"

    def __init__(self, tmpdir, *, backends: dict, redis_url: str, workers: int = 2,
                 extra_toml: str = "", server_overrides: dict | None = None,
                 protocols=("imap", "pop3"), sections: dict | None = None,
                 listeners: dict | None = None, python: str = sys.executable):
        super().__init__(tmpdir)
        self.python = python          # the interpreter that runs the gateway
        self.backends = backends
        self.redis_url = redis_url
        self.workers = workers
        self.extra_toml = extra_toml
        self.server_overrides = dict(server_overrides or {})
        self.protocols = tuple(protocols)
        self.listeners = {k: dict(v) for k, v in (listeners or {}).items()} or \
            {protocol: {"protocol": protocol} for protocol in self.protocols}
        self.sections = {k: dict(v) for k, v in (sections or {}).items()}
        self.host = LOOPBACK
        self.ports: dict[str, int] = {}
        self.config_path = self.tmpdir / "gateway.toml"
        self.log_path = self.tmpdir / "gateway.log"

    @property
    def imap_port(self) -> int | None:
        return self.ports.get("imap")

    @property
    def pop3_port(self) -> int | None:
        return self.ports.get("pop3")

    @property
    def submission_port(self) -> int | None:
        return self.ports.get("submission")

    def write_config(self) -> Path:
        """Write the TOML config (new free ports each time) and return its path."""
        self.ports = {name: free_port() for name in self.listeners}
        sections = {k: dict(v) for k, v in self.sections.items()}
        server = {"workers": self.workers, "graceful_timeout": 5, "heartbeat_timeout": 10,
                  "run_dir": str(self.tmpdir / "run"), "log_level": "debug"}
        if "auth_failure_delay" in _server_keys():
            server["auth_failure_delay"] = 0   # tests fail logins on purpose; not the default
        if "probe_backends" in _server_keys():
            # Scripted test back-ends take every connection for the gateway's login.
            server["probe_backends"] = False
        server.update(self.server_overrides)
        server.update(sections.pop("server", {}))
        parts = [_toml_table("[server]", server)]
        for name, port in self.ports.items():
            parts.append(_toml_table("[[listen]]", {
                "protocol": name, "address": f"{self.host}:{port}",
                "tls": "none", "proxy_protocol": False, **self.listeners[name]}))
        parts.append(_toml_table("[redis]", {"url": self.redis_url, **sections.pop("redis", {})}))
        for name, backend in self.backends.items():
            if not isinstance(backend, dict):
                host, imap_port, pop3_port = backend
                backend = {"address": host, "imap_port": imap_port, "pop3_port": pop3_port}
            parts.append(_toml_table(f"[backends.{json.dumps(name)}]", backend))
        parts.append(_toml_table("[directory]",
                                 {"source": "export", **sections.pop("directory", {})}))
        for name, values in sections.items():
            parts.append(_toml_table(f"[{name}]", values))
        if self.extra_toml:
            parts.append(self.extra_toml)
        self.config_path.write_text("\n".join(parts))
        return self.config_path

    def _env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self, timeout: float = 30.0, attempts: int = 3) -> "GatewayProcess":
        """Start the master and wait until every listener accepts a connection.

        A port found free can be taken before the master binds it (by another process's
        listener or outgoing connection): then the start is tried again on new ports."""
        for attempt in range(1, attempts + 1):
            self.write_config()
            self._spawn([self.python, "-m", "gateway", "serve",
                         "--config", str(self.config_path)],
                        self.log_path, cwd=REPO_ROOT, env=self._env())
            try:
                self._await_ports(self.ports.values(), "gateway",
                                  lambda: f"--- {self.log_path} ---\n{_tail(self.log_path)}",
                                  timeout)
                return self
            except RuntimeError as exc:
                if attempt == attempts or "Address already in use" not in str(exc):
                    raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the master, wait up to ``timeout``, then SIGKILL its process group.

        Returns the master's exit code; ``leftover_pids`` lists group members that were
        still alive after the master exited (orphaned workers, a forgotten redis-server).
        """
        return super().stop(sig, timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """The master's direct children that are workers (an embedded redis-server is not)."""
        master = self.pid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            stat = _proc_stat(int(entry))
            if stat is None or stat[1] != master or stat[0] == "Z":
                continue
            if stat[3] == "redis-server" or "redis-server" in _cmdline(int(entry)):
                continue
            found.append(int(entry))
        return sorted(found)

    def route(self, routes: dict) -> subprocess.CompletedProcess:
        """Write a directory export (login → backend or (backend, backend_login)) and sync it."""
        export = self.tmpdir / f"routes-{time.time_ns()}.csv"
        with open(export, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["login", "backend", "backend_login"])
            for login, target in routes.items():
                backend, backend_login = (target, "") if isinstance(target, str) else target
                writer.writerow([login, backend, backend_login])
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "sync", "export", str(export),
             "--config", str(self.config_path)],
            cwd=REPO_ROOT, env=self._env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"gateway sync export failed with {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result


# -- OpenLDAP ---------------------------------------------------------------------------------

# The attributes of an Active Directory user that the gateway reads, as an auxiliary class an
# OpenLDAP test server accepts (OpenLDAP has no native uSNChanged: tests set it themselves).
AD_LIKE_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'msExchHomeServerName'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.2 NAME 'userPrincipalName'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.3 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.4 NAME 'proxyAddresses'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.3.6.1.4.1.55555.1.5 NAME 'uSNChanged'
    EQUALITY integerMatch ORDERING integerOrderingMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.6 NAME 'objectGUID'
    EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.7 NAME 'isDeleted'
    EQUALITY booleanMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.7 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'mailgateADUser' SUP top AUXILIARY
    MAY ( msExchHomeServerName $ userPrincipalName $ sAMAccountName $ proxyAddresses $
          uSNChanged $ objectGUID $ isDeleted $ mail ) )
"""


def self_signed_certificate(folder: Path, host: str = LOOPBACK) -> tuple[Path, Path]:
    """(cert, key) PEM files for ``host`` (an IP SAN and "localhost"), valid for a day."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgate test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Slapd(_Process):
    """OpenLDAP's slapd with its own slapd.conf: an mdb database loaded with ``ldif`` by
    slapadd (fast, and it keeps given operational attributes such as modifyTimestamp),
    ldap:// (StartTLS offered) and ldaps:// on free loopback ports, a self-signed certificate.

    The rootdn is for test set-up only; the gateway binds as ``SERVICE_DN``, whose searches
    stop at ``size_limit`` entries unless paged (as Active Directory's MaxPageSize does).
    """

    name = "slapd"
    SUFFIX = "dc=example,dc=com"
    ROOT_DN = "cn=admin,dc=example,dc=com"
    ROOT_PASSWORD = "admin-secret"
    SERVICE_DN = "cn=mailgate,ou=services,dc=example,dc=com"
    SERVICE_PASSWORD = "mailgate-secret"
    SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "misc")

    def __init__(self, tmpdir, ldif: str = "", size_limit: int = 1000):
        super().__init__(tmpdir)
        self.ldif = ldif
        self.size_limit = size_limit
        self.host = LOOPBACK
        self.port = 0
        self.ldaps_port = 0
        self.ca_file: Path | None = None

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}:{self.ldaps_port}"

    def _config(self) -> str:
        root = self.tmpdir
        includes = "".join(f"include /etc/ldap/schema/{name}.schema\n" for name in self.SCHEMAS)
        return f"""\
# Written by tests/servers.py for a test directory.
{includes}include {root}/mailgate-ad.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
TLSCertificateFile {root}/cert.pem
TLSCertificateKeyFile {root}/key.pem

database mdb
maxsize 268435456
suffix "{self.SUFFIX}"
rootdn "{self.ROOT_DN}"
rootpw {self.ROOT_PASSWORD}
directory {root}/data
index objectClass eq
index uid,mail,cn,userPrincipalName,sAMAccountName,proxyAddresses eq
limits dn.exact="{self.SERVICE_DN}" size.soft={self.size_limit} size.hard={self.size_limit} size.prtotal=unlimited
access to attrs=userPassword by anonymous auth by * none
access to * by users read by * none
"""

    def _base_ldif(self) -> str:
        return (f"dn: {self.SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
                f"dc: example\no: Example\n\n"
                f"dn: ou=services,{self.SUFFIX}\nobjectClass: organizationalUnit\n"
                f"ou: services\n\n"
                f"dn: {self.SERVICE_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\n"
                f"cn: mailgate\nsn: mailgate\nuserPassword: {self.SERVICE_PASSWORD}\n\n")

    def start(self) -> "Slapd":
        binary, slapadd = find_binary("slapd"), find_binary("slapadd")
        if binary is None or slapadd is None:
            raise FileNotFoundError("slapd is not installed")
        (self.tmpdir / "data").mkdir(exist_ok=True)
        (self.tmpdir / "mailgate-ad.schema").write_text(AD_LIKE_SCHEMA)
        self.ca_file, _ = self_signed_certificate(self.tmpdir, self.host)
        conf = self.tmpdir / "slapd.conf"
        conf.write_text(self._config())
        data = self.tmpdir / "data.ldif"
        data.write_text(self._base_ldif() + self.ldif)
        loaded = subprocess.run([slapadd, "-q", "-f", str(conf), "-l", str(data)],
                                capture_output=True, text=True, timeout=300)
        if loaded.returncode != 0:
            raise RuntimeError(f"slapadd failed ({loaded.returncode}):\n{loaded.stderr[-3000:]}")
        self.port, self.ldaps_port = free_port(), free_port()
        urls = f"ldap://{self.host}:{self.port}/ ldaps://{self.host}:{self.ldaps_port}/"
        # -d keeps slapd in the foreground (no fork), logging nothing but errors.
        self._spawn([binary, "-d", "0", "-h", urls, "-f", str(conf)], self.tmpdir / "slapd.log")
        self._await_ports((self.port, self.ldaps_port), "slapd",
                          lambda: _tail(self.tmpdir / "slapd.log"))
        return self

    def admin(self):
        """An ldap3 connection bound as the rootdn, for setting up and changing entries."""
        import ldap3
        server = ldap3.Server(self.host, port=self.port, get_info=ldap3.NONE)
        return ldap3.Connection(server, self.ROOT_DN, self.ROOT_PASSWORD, auto_bind=True,
                                raise_exceptions=True, receive_timeout=30)


class HAProxy(_Process):
    """The real haproxy in the foreground (``-db``) with a given configuration text;
    ``start()`` waits until every port in ``ports`` accepts connections."""

    name = "haproxy"

    def __init__(self, tmpdir, config_text: str, ports):
        super().__init__(tmpdir)
        self.host = LOOPBACK
        self.config_text = config_text
        self.ports = list(ports)
        self.config_path = self.tmpdir / "haproxy.cfg"
        self.log_path = self.tmpdir / "haproxy.log"

    def start(self) -> "HAProxy":
        binary = find_binary("haproxy")
        if binary is None:
            raise FileNotFoundError("haproxy is not installed")
        self.config_path.write_text(self.config_text)
        check = subprocess.run([binary, "-c", "-f", str(self.config_path)],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c failed:\n{check.stdout}{check.stderr}")
        self._spawn([binary, "-db", "-f", str(self.config_path)], self.log_path)
        self._await_ports(self.ports, "haproxy", lambda: _tail(self.log_path))
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
