"""Socket-level fuzzing: a few thousand sessions of random bytes and mangled commands over real
sockets to the gateway's IMAP and POP3 listeners, then: no traceback in the gateway log, the
same worker processes alive, and a normal login still works.

The seed is printed (``pytest -s``); MAILGATE_FUZZ_SEED replays one run, MAILGATE_FUZZ_SESSIONS
changes its size (the soak run uses more).
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from conftest import ROUTES, USERS_A
from load import one_login

IMAP_PIECES = [
    b"a1 ", b"LOGIN ", b"AUTHENTICATE PLAIN", b"AUTHENTICATE LOGIN", b"CAPABILITY", b"NOOP",
    b"ID (\"name\" \"x\")", b"STARTTLS", b"LOGOUT", b"SELECT INBOX", b"{5}\r\nhello", b"{3+}\r\nabc",
    b"~{2}\r\nab", b"{99999999999}\r\n", b"{0}\r\n", b"\"quoted\\\"\"", b"alice@example.com",
    b"alice-secret", b"*", b"+", b"(", b")", b"[", b"]", b"\r\n", b"\n", b"\r", b" ", b"\x00",
    b"\xff\xfe", b"AHVzZXIAcGFzcw==", b"=", b"%", b"\"", b"\\", b"a" * 70,
]
POP3_PIECES = [
    b"USER ", b"PASS ", b"CAPA", b"AUTH PLAIN", b"AUTH PLAIN AHVzZXIAcGFzcw==", b"STLS",
    b"QUIT", b"APOP x y", b"STAT", b"RETR 1", b"TOP 1 0", b"UIDL", b"alice@example.com",
    b"bob-secret", b"*", b"=", b"\r\n", b"\n", b"\r", b" ", b"\x00", b"\xff", b"x" * 70,
]


def payload(rng: random.Random, pieces: list[bytes]) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return rng.randbytes(rng.randint(0, 600))
    if kind < 0.4:
        return rng.randbytes(rng.randint(1, 40)) * rng.randint(1, 200)    # long lines
    parts = [rng.choice(pieces) for _ in range(rng.randint(1, 30))]
    if rng.random() < 0.2:                       # a flipped byte somewhere
        data = bytearray(b"".join(parts))
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return b"".join(parts)


def fuzz_session(port: int, data: bytes, rng: random.Random) -> bytes:
    """Send ``data`` (in random chunks), half-close, read what comes back until EOF."""
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            pos = 0
            while pos < len(data):
                step = rng.randint(1, 512)
                sock.sendall(data[pos:pos + step])
                pos += step
            if rng.random() < 0.2:
                return answer            # hang up without reading
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2)
            while len(answer) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        pass       # reset, timed out: the gateway may hang up on garbage; it must not crash
    return answer


def run_fuzz(gateway, sessions: int, seed: int, threads: int = 8) -> list[bytes]:
    tracebacks: list[bytes] = []
    counter = iter(range(sessions))
    lock = threading.Lock()

    def loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            imap = rng.random() < 0.65
            port = gateway.imap_port if imap else gateway.pop3_port
            answer = fuzz_session(port, payload(rng, IMAP_PIECES if imap else POP3_PIECES), rng)
            greeting = b"* OK" if imap else b"+OK"
            if b"Traceback" in answer or (answer and not answer.startswith(greeting)):
                tracebacks.append(answer[:500])

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    return tracebacks


def test_fuzzed_sessions_leave_the_gateway_intact(make_gateway, request):
    sessions = int(os.environ.get("MAILGATE_FUZZ_SESSIONS", "3000"))
    seed = int(os.environ.get("MAILGATE_FUZZ_SEED", str(random.randrange(1 << 30))))
    gateway = make_gateway(workers=2, routes=ROUTES,
                           server_overrides={"log_level": "info"},
                           sections={"imap": {"preauth_timeout": 3},
                                     "pop3": {"preauth_timeout": 3}})
    pids = gateway.worker_pids()
    started = time.monotonic()
    leaked = run_fuzz(gateway, sessions, seed)
    print(f"socket fuzz: {sessions} sessions (seed {seed}) in {time.monotonic() - started:.1f} s")
    assert leaked == [], leaked[:3]
    assert gateway.worker_pids() == pids, gateway.log_text()[-3000:]
    text = gateway.log_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 1500:][:4000]
    assert one_login(gateway.imap_port, "alice@example.com",
                     USERS_A["alice@example.com"]).outcome == "ok"


@pytest.mark.soak
def test_fuzz_soak(make_gateway, monkeypatch):
    """``make test-soak``: 20,000 sessions."""
    monkeypatch.setenv("MAILGATE_FUZZ_SESSIONS", os.environ.get("MAILGATE_SOAK_SESSIONS", "20000"))
    test_fuzzed_sessions_leave_the_gateway_intact(make_gateway, None)
