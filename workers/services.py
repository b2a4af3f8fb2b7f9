"""Helper processes the master supervises beside its workers: the embedded Redis and the
periodic directory sync job.

The embedded Redis is private to one gateway host: a unix socket in the run folder, nothing
saved to disk. Production setups point ``[redis] url`` at a shared Redis instead.

The sync job is ``python -m gateway sync ldap --incremental`` in a child process, so the
master itself never loads ldap3 (nor gevent): it only starts, reaps and schedules it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("mailgate.services")


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """TERM, wait, then KILL: a supervised child never outlives the master."""
    if process is None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    except (ProcessLookupError, ChildProcessError):
        pass


class ServiceError(Exception):
    """A service cannot start; str() is one line for the operator."""


class EmbeddedRedis:
    """A private ``redis-server`` on a unix socket, restarted by the master when it dies."""

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.socket_path = os.path.join(self.run_dir, "redis.sock")
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, wait: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server is missing: install it with "
                               "'apt-get install redis-server', or set [redis] url")
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        args = [binary, "--port", "0", "--unixsocket", self.socket_path,
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", self.run_dir, "--daemonize", "no", "--loglevel", "warning",
                "--logfile", os.path.join(self.run_dir, "redis.log")]
        # Own process group: a Ctrl-C on the terminal reaches the master only, which then
        # stops Redis after its workers (they may still be answering lookups).
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        start_new_session=True, close_fds=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(f"embedded redis-server exited with {self.process.returncode}; "
                                   f"see {self.run_dir}/redis.log")
            if self._answers():
                log.info("embedded redis pid=%d socket=%s", self.process.pid, self.socket_path)
                return
            time.sleep(0.02)
        raise ServiceError(f"embedded redis-server did not answer on {self.socket_path}")

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(0.5)
                probe.connect(self.socket_path)
                probe.sendall(b"PING\r\n")
                return probe.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def reap(self, pid: int) -> bool:
        """True when pid was this Redis (then it is restarted)."""
        if self.process is None or pid != self.process.pid:
            return False
        log.error("embedded redis pid=%d died; restarting", pid)
        self.process.returncode = 0
        self.process = None
        self.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        stop_process(process, timeout)


class SyncJob:
    """Runs the incremental LDAP sync every ``directory.sync_interval`` seconds.

    The first run starts with the master (it does a full sync when the cache has none); each
    next one ``interval`` seconds after the previous one ended, so runs never overlap.  The
    child's output goes to the master's stderr (its summary line lands in the gateway log).
    """

    def __init__(self, config_path: str, interval: float):
        self.config_path = os.path.abspath(config_path)
        self.interval = interval
        self.process: subprocess.Popen | None = None
        self.next_run = time.monotonic()

    @classmethod
    def for_config(cls, config, current: "SyncJob | None" = None) -> "SyncJob | None":
        """The job a config asks for (None: source is not LDAP or no interval), reusing
        ``current`` (a HUP keeps a running sync and its schedule)."""
        directory = config.directory
        if directory.source != "ldap" or directory.sync_interval <= 0:
            return None
        if current is None:
            return cls(config.path, directory.sync_interval)
        current.config_path = os.path.abspath(config.path)
        current.interval = directory.sync_interval
        return current

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def tick(self) -> None:
        """Start a run when one is due and none is running (called every master pass)."""
        if self.process is None and time.monotonic() >= self.next_run:
            self.start()

    def start(self) -> None:
        import gateway
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(gateway.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "gateway", "sync", "ldap", "--incremental",
                "--config", self.config_path]
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env,
                                            close_fds=True)
        except OSError as exc:
            log.error("directory sync cannot start: %s", exc)
            self.next_run = time.monotonic() + self.interval
            return
        log.info("directory sync pid=%d started", self.process.pid)

    def reap(self, pid: int, status: int) -> bool:
        """True when pid was this job's run (reaped by the master's waitpid)."""
        if self.process is None or pid != self.process.pid:
            return False
        code = os.waitstatus_to_exitcode(status)
        self.process.returncode = code
        self.process = None
        self.next_run = time.monotonic() + self.interval
        if code == 0:
            log.info("directory sync pid=%d done", pid)
        else:
            log.warning("directory sync pid=%d failed (exit %s); next try in %ss", pid, code,
                        self.interval)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        stop_process(process, timeout)
