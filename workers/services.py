"""Helper processes the master supervises beside its workers: the embedded Redis and the
periodic directory sync job.

The embedded Redis is private to one gateway host: a unix socket in the run folder, with an
append-only file and a snapshot there too, so that a restarted Redis (killed, OOM, a master
restart) comes back with its cache.  Production setups point ``[redis] url`` at a shared Redis
instead.  ``CacheRefill`` covers what persistence does not: a Redis that comes back empty or
with an older generation gets the last full sync again.

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


def _reaped(process, pid: int, status: int) -> int | None:
    """The exit code when ``pid`` (reaped by the master's waitpid) was ``process``, else
    None; the code is recorded on the process object as Popen would."""
    if process is None or pid != process.pid:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode


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
        # AOF fsynced every second (a kill -9 loses at most the last second of a sync) plus
        # an RDB snapshot; Redis loads them itself when it starts again.
        args = [binary, "--port", "0", "--unixsocket", self.socket_path,
                "--unixsocketperm", "700", "--save", "300 1 60 1000",
                "--appendonly", "yes", "--appendfsync", "everysec",
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
                # -LOADING: up, reading its append-only file; lookups fail (tempfail) until
                # it is done, but the master need not wait for a large cache to load.
                return probe.recv(16).startswith((b"+PONG", b"-LOADING"))
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


def gateway_command(argv: list[str], config_path: str) -> subprocess.Popen:
    """``python -m gateway ARGV --config FILE`` in a child (output to the master's stderr)."""
    import gateway
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gateway.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, "-m", "gateway", *argv, "--config",
                             os.path.abspath(config_path)],
                            stdin=subprocess.DEVNULL, env=env, close_fds=True)


class CacheRefill:
    """Re-runs this host's last full sync when Redis has lost the directory cache.

    Every ``CHECK_INTERVAL`` seconds (and right after the embedded Redis restarted) the master
    reads the live generation (one GET, bounded by a short timeout) and compares it with
    ``<run_dir>/last-sync.json`` (gateway/directory/lastsync.py): an empty cache, or one older
    than that sync, gets the same sync again in a child process.  A failed refill is retried
    after ``RETRY_INTERVAL``.  Nothing happens before the first full sync on this host.
    """

    CHECK_INTERVAL = 2.0
    RETRY_INTERVAL = 30.0
    PROBE_TIMEOUT = 0.5

    def __init__(self, config):
        self.config = config
        self.process: subprocess.Popen | None = None
        self.next_check = time.monotonic()
        self.client = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def reconfigure(self, config) -> None:
        """A HUP: the next check uses the new config (and a new client)."""
        self.config = config
        if self.client is not None:
            self.client.close()
            self.client = None

    def soon(self) -> None:
        """Check at the next tick (the embedded Redis was just restarted)."""
        self.next_check = time.monotonic()

    def tick(self) -> None:
        if self.process is not None or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + self.CHECK_INTERVAL
        from gateway.directory import lastsync   # (no Redis client in a master that never syncs)
        last = lastsync.recall(self.config)
        if last is None:
            return
        try:
            reason = lastsync.refill_reason(self._client(), last)
        except Exception as exc:  # noqa: BLE001 - down, loading, timed out: judge it later
            log.debug("directory cache check: %s", exc)
            return
        if reason:
            self.start(last, reason)

    def _client(self):
        if self.client is None:
            import dataclasses
            from gateway.directory import cache
            # The workers' own way to reach Redis (embedded socket, URL, whatever the config
            # says), with a short timeout: the master's loop must not wait on a hung Redis.
            short = dataclasses.replace(self.config.redis, timeout=self.PROBE_TIMEOUT)
            self.client = cache.connect(dataclasses.replace(self.config, redis=short))
        return self.client

    def start(self, last, reason: str) -> None:
        # ``sync refill`` repeats the recorded sync only if, under the sync lock, the cache is
        # still stale: a sync run by hand meanwhile is not undone.
        log.warning("%s; refilling it: python -m gateway sync refill (%s)", reason,
                    " ".join(last.argv()))
        try:
            self.process = gateway_command(["sync", "refill"], self.config.path)
        except OSError as exc:
            log.error("directory refill cannot start: %s", exc)
            self.next_check = time.monotonic() + self.RETRY_INTERVAL

    def reap(self, pid: int, status: int) -> bool:
        """True when pid was a refill run."""
        code = _reaped(self.process, pid, status)
        if code is None:
            return False
        self.process = None
        if code == 0:
            log.info("directory refill pid=%d done", pid)
        else:
            log.error("directory refill pid=%d failed (exit %s); next try in %ss", pid, code,
                      self.RETRY_INTERVAL)
            self.next_check = time.monotonic() + self.RETRY_INTERVAL
        return True

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        stop_process(process, timeout)
        if self.client is not None:
            self.client.close()


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
        try:
            self.process = gateway_command(["sync", "ldap", "--incremental"], self.config_path)
        except OSError as exc:
            log.error("directory sync cannot start: %s", exc)
            self.next_run = time.monotonic() + self.interval
            return
        log.info("directory sync pid=%d started", self.process.pid)

    def reap(self, pid: int, status: int) -> bool:
        """True when pid was this job's run (reaped by the master's waitpid)."""
        code = _reaped(self.process, pid, status)
        if code is None:
            return False
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
