"""Helper processes the master supervises beside its workers: the embedded Redis.

The embedded Redis is private to one gateway host: a unix socket in the run folder, nothing
saved to disk. Production setups point ``[redis] url`` at a shared Redis instead.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time

log = logging.getLogger("mailgate.services")


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
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except ProcessLookupError:
            pass
