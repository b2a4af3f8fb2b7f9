"""Log lines (key=value and JSON, no credentials at debug level) and ``python -m gateway
status`` (0 healthy, 1 degraded, 2 down)."""
from __future__ import annotations

import base64
import imaplib
import json
import signal
import subprocess
import sys

import pytest

import servers
from clients import ImapRaw, LineClient
from conftest import USERS_A
from ops_helpers import pop_login, try_login, wait_until

ALICE = "alice@example.com"
SECRET = "Sekr1t pass phrase"     # the gateway is configured to log at debug level


def _plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def test_no_password_or_auth_payload_in_debug_logs(make_gateway):
    gateway = make_gateway(routes={ALICE: "A"})
    assert 'log_level = "debug"' in gateway.config_path.read_text()
    right, wrong = USERS_A[ALICE], SECRET
    client, _ = try_login(gateway, ALICE, right)
    client.logout()
    assert "AUTHENTICATIONFAILED" in try_login(gateway, ALICE, wrong)[1]
    for password in (right, wrong):          # AUTHENTICATE PLAIN, continuation and SASL-IR
        client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
        try:
            client.authenticate("PLAIN", lambda _, p=password: f"\0{ALICE}\0{p}".encode())
            client.logout()
        except imaplib.IMAP4.error:
            client.shutdown()
        raw = ImapRaw(gateway.imap_port)
        raw.send(f"a AUTHENTICATE PLAIN {_plain(ALICE, password)}\r\n".encode())
        raw.until_tagged(b"a")
        raw.close()
    pop = pop_login(gateway, ALICE, right)
    pop.quit()
    raw = LineClient(gateway.pop3_port)
    raw.send(f"AUTH PLAIN {_plain(ALICE, wrong)}\r\n".encode())
    assert raw.line().startswith(b"-ERR")
    raw.close()
    assert wait_until(lambda: gateway.log_text().count("event=session-end") >= 8)
    text = gateway.log_text()
    assert "event=login-failed" in text and "login=alice@example.com" in text
    for secret in (right, wrong, _plain(ALICE, right), _plain(ALICE, wrong), "Sekr1t"):
        assert secret not in text
    # Values are readable: a reason with spaces is quoted, never \x20-escaped.
    assert "\\x20" not in text
    assert 'end="client closed"' in text or 'end="client logged out"' in text or \
        "end=logout" in text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT])
def test_a_stopping_worker_writes_the_session_lines_it_holds(make_gateway, sig):
    """A worker holds its session-end lines for a moment (gateway.logs.held_event) and
    writes them before it exits, on a graceful stop (TERM) and on a stop now (QUIT)."""
    gateway = make_gateway(routes={ALICE: "A"})
    clients = [try_login(gateway, ALICE, USERS_A[ALICE])[0] for _ in range(3)]
    for client in clients[:2]:
        client.logout()
    gateway.stop(sig)          # the third session is still open: QUIT ends it now
    lines = [line for line in gateway.log_text().splitlines()
             if "event=session-end" in line and f"login={ALICE}" in line]
    assert len(lines) == 3, gateway.log_text()[-3000:]
    clients[2].shutdown()


def test_json_log_lines_carry_the_session_fields(make_gateway):
    gateway = make_gateway(routes={ALICE: "A"}, server_overrides={"log_format": "json"})
    client, _ = try_login(gateway, ALICE, USERS_A[ALICE])
    client.select("INBOX")
    client.logout()

    def session_end():
        for line in gateway.log_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == "session-end" and entry.get("login") == ALICE:
                    return entry
        return None

    entry = wait_until(session_end)
    assert entry is not None, gateway.log_text()[-2000:]
    assert entry["client"] == "127.0.0.1" and entry["backend"] == "A"
    assert entry["proto"] == "imap" and entry["tls"] is False
    assert entry["state"] == "proxying" and entry["bytes_out"] > 0 and entry["bytes_in"] > 0
    assert entry["duration"] >= 0 and entry["session"] and entry["level"] == "info"
    # Every line the gateway wrote is JSON (master, workers, sync job output aside).
    assert all(json.loads(line) for line in gateway.log_text().splitlines()
               if line.startswith("{"))


def _status(gateway) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "status", "--config", str(gateway.config_path)],
        cwd=servers.REPO_ROOT, env=gateway._env(), capture_output=True, text=True,
        timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_status_healthy_degraded_and_down(make_gateway, tmp_path):
    redis = servers.RedisServer(tmp_path / "redis").start()
    try:
        gateway = make_gateway(redis_url=redis.url)
        code, text = _status(gateway)
        assert code == 1 and "never synced" in text, text         # degraded
        gateway.route({ALICE: "A"})
        client, _ = try_login(gateway, ALICE, USERS_A[ALICE])
        code, text = wait_until(lambda: (lambda r: r if "imap" in r[1] and ": 1" in r[1]
                                         else None)(_status(gateway)))
        assert code == 0 and "status:      healthy" in text, text
        assert "2 of 2 workers" in text and "generation" in text and "reachable" in text
        assert "backend:     A: 0 connect errors" in text
        client.logout()
        redis.stop()
        code, text = _status(gateway)
        assert code == 2 and "Redis unreachable" in text, text    # down
    finally:
        redis.stop()
    gateway.stop()
    code, text = _status(gateway)
    assert code == 2 and "master is not running" in text, text
