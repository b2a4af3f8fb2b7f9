"""A steady load of real IMAP sessions for the fault tests: a few threads log in, NOOP and
log out in a loop with imaplib, and record every attempt's outcome and time.

Outcomes: "ok", "unavailable" (NO [UNAVAILABLE]: the gateway's answer to a directory or
back-end it cannot use), "auth" (NO [AUTHENTICATIONFAILED]), "bye" (a BYE before the login
answer), "error" (anything else: refused, reset, timed out, no greeting).
"""
from __future__ import annotations

import imaplib
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    started: float
    ended: float
    outcome: str
    detail: str = ""


def one_login(port: int, login: str, password: str, timeout: float = 10.0) -> Attempt:
    """Connect, log in, NOOP, log out: one Attempt."""
    started = time.monotonic()
    outcome, detail = "ok", ""
    client = None
    try:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=timeout)
        client.login(login, password)
        client.noop()
        client.logout()
        client = None
    except imaplib.IMAP4.error as exc:
        detail = str(exc)
        if "UNAVAILABLE" in detail:
            outcome = "unavailable"
        elif "AUTHENTICATIONFAILED" in detail:
            outcome = "auth"
        elif "BYE" in detail.upper():
            outcome = "bye"
        else:
            outcome = "error"
    except (OSError, EOFError) as exc:
        outcome, detail = "error", repr(exc)
    finally:
        if client is not None:
            try:
                client.shutdown()
            except OSError:
                pass
    return Attempt(started, time.monotonic(), outcome, detail)


class LoginLoad:
    """``with LoginLoad(port, users) as load:`` runs ``threads`` login loops until the block
    ends.  ``users`` maps login → password; threads take them in turn."""

    def __init__(self, port: int, users: dict[str, str], threads: int = 4,
                 pause: float = 0.0):
        self.port = port
        self.users = list(users.items())
        self.threads = threads
        self.pause = pause
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> "LoginLoad":
        for index in range(self.threads):
            thread = threading.Thread(target=self._loop, args=(index,), daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(30)

    def _loop(self, index: int) -> None:
        users = itertools.islice(itertools.cycle(self.users), index, None)
        for login, password in users:
            if self._stop.is_set():
                return
            attempt = one_login(self.port, login, password)
            with self._lock:
                self.attempts.append(attempt)
            if self.pause:
                self._stop.wait(self.pause)

    # -- reading the record ------------------------------------------------------------------

    def snapshot(self) -> list[Attempt]:
        with self._lock:
            return list(self.attempts)

    def between(self, start: float, end: float = float("inf")) -> list[Attempt]:
        """Attempts that started in [start, end)."""
        return [a for a in self.snapshot() if start <= a.started < end]

    def count(self, outcome: str, start: float = 0.0, end: float = float("inf")) -> int:
        return sum(1 for a in self.between(start, end) if a.outcome == outcome)

    def failures(self, start: float = 0.0, end: float = float("inf")) -> list[Attempt]:
        return [a for a in self.between(start, end) if a.outcome != "ok"]

    def wait_for_successes(self, after: float, count: int = 3, timeout: float = 60.0) -> float | None:
        """The monotonic time of the first of ``count`` consecutive successes that started
        after ``after``; None if that does not happen within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run, first = 0, None
            for attempt in sorted(self.between(after), key=lambda a: a.started):
                if attempt.outcome == "ok":
                    run += 1
                    first = first if first is not None else attempt.started
                    if run >= count:
                        return first
                else:
                    run, first = 0, None
            time.sleep(0.05)
        return None

    def wait_for_attempts(self, count: int, after: float = 0.0, timeout: float = 60.0) -> bool:
        """True once ``count`` attempts started after ``after`` have ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.between(after)) >= count:
                return True
            time.sleep(0.05)
        return False

    def summary(self, start: float = 0.0, end: float = float("inf")) -> str:
        counts: dict[str, int] = {}
        for attempt in self.between(start, end):
            counts[attempt.outcome] = counts.get(attempt.outcome, 0) + 1
        return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def open_raw(port: int, timeout: float = 10.0) -> socket.socket:
    """A plain socket to the gateway, greeting not read."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _server_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the gateway's end of a loopback connection (from /proc/net/tcp)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    local, remote = fields[1], fields[2]
                    if int(local.rsplit(":", 1)[1], 16) == server_port and \
                            int(remote.rsplit(":", 1)[1], 16) == client_port:
                        return fields[9]
        except OSError:
            continue
    return None


def owner_pid(client: socket.socket, server_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` (the workers) holds the gateway's end of ``client``'s connection."""
    inode = _server_inode(server_port, client.getsockname()[1])
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None
