"""Small test helpers that are neither servers nor clients."""
from __future__ import annotations

import atexit
import contextlib
import random
import re
import shutil
import socket
import tempfile
import threading
import time

# How the replay tests cut a stream: as a network might deliver it.
SPLIT_MODES = ["whole", "lines", "bytes", "random1", "random2", "random3"]


def run_dir() -> str:
    """A folder for a test module's ``[server] run_dir``, removed when the test run ends."""
    path = tempfile.mkdtemp(prefix="mailgate-test-run-")
    atexit.register(shutil.rmtree, path, True)
    return path


def split(stream: bytes, mode: str) -> list[bytes]:
    """``stream`` cut by ``mode`` (one of SPLIT_MODES): whole, at each line end, byte by
    byte, or in random chunks of 1 to 9 bytes (seeded by the mode's number)."""
    if mode == "whole":
        return [stream]
    if mode == "lines":
        return [piece for piece in re.split(rb"(?<=\n)", stream) if piece]
    if mode == "bytes":
        return [stream[i:i + 1] for i in range(len(stream))]
    rng = random.Random(int(mode[len("random"):]))
    pieces, pos = [], 0
    while pos < len(stream):
        size = rng.randint(1, 9)
        pieces.append(stream[pos:pos + size])
        pos += size
    return pieces


class Tripwire:
    """A listener where credentials must never arrive: ``seen`` holds what any connection
    sent.  Use as a context manager; the watching thread ends within ``timeout``."""

    def __init__(self, listener: socket.socket, timeout: float = 0.5):
        self.listener = listener
        self.listener.settimeout(timeout)
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        try:
            conn, _ = self.listener.accept()
            self.seen.append(conn.recv(4096))
            conn.close()
        except OSError:
            pass

    def __enter__(self) -> "Tripwire":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(5)


@contextlib.contextmanager
def hammer_lookups(directory, login: str, field: str):
    """Look ``login`` up in a loop while the body runs; ``.seen`` collects the record's
    ``field``, ``.failures`` an exception or a miss (the thread stops at the first)."""
    stop = threading.Event()
    state = type("Hammer", (), {})()
    state.seen, state.failures = [], []

    def hammer():
        while not stop.is_set():
            try:
                record = directory.lookup(login)
            except Exception as exc:  # the test reports it, not the thread
                state.failures.append(exc)
                return
            if record is None:
                state.failures.append(f"{login} not found")
                return
            state.seen.append(getattr(record, field))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll until predicate() is truthy; its value, or None at the timeout (never hangs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
