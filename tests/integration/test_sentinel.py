"""More than one gateway host on one Redis, found through Sentinel: kicks and moves through one
instance close the sessions held by the other; when the Redis primary dies, Sentinel promotes
the replica and logins go on (a short window of NO [UNAVAILABLE], never a wrong answer), and
the moves subscribers of every worker follow the new primary."""
from __future__ import annotations

import imaplib
import signal
import subprocess
import sys
import threading
import time

import pytest

import servers
from conftest import ROUTES, USERS_A, require_binary
from ops_helpers import try_login, wait_until
from sentinel_servers import SERVICE, RedisNode, SentinelProcess

ALICE, ALICE_PW = "alice@example.com", USERS_A["alice@example.com"]
KICKED = b"* BYE [UNAVAILABLE] Session closed by an administrator, please reconnect"
MOVED = b"* BYE [UNAVAILABLE] Mailbox moved, please reconnect"


@pytest.fixture
def replicated(tmp_path):
    """(primary, replica, sentinel), the replica in sync; all stopped at teardown."""
    require_binary("redis-sentinel", "redis-sentinel")
    primary = RedisNode(tmp_path / "primary").start()
    replica = RedisNode(tmp_path / "replica", primary.port).start()
    sentinel = SentinelProcess(tmp_path / "sentinel", primary.port).start()
    try:
        assert wait_until(lambda: replica.replication().get("master_link_status") == "up")
        assert sentinel.wait_replicas(1)
        yield primary, replica, sentinel
    finally:
        for process in (sentinel, replica, primary):
            process.stop()


def _command(gateway, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args,
                           "--config", str(gateway.config_path)],
                          cwd=servers.REPO_ROOT, env=gateway._env(), capture_output=True,
                          text=True, timeout=60)


def _bye(client: imaplib.IMAP4, timeout: float = 10.0) -> bytes:
    client.sock.settimeout(timeout)
    return client.readline().rstrip(b"\r\n")


def _kick_reaches(gateway, workers: int):
    result = _command(gateway, "kick", ALICE)
    return result.returncode == 0 and f"sent to {workers} workers" in result.stdout


@pytest.fixture
def two_gateways(make_gateway, replicated):
    primary, replica, sentinel = replicated
    dead = servers.free_port()      # a Sentinel that is down: the client tries the next one
    redis_section = {"sentinels": [f"127.0.0.1:{dead}", sentinel.address],
                     "service_name": SERVICE, "timeout": 1.0}
    first = make_gateway(redis_url="", workers=2, sections={"redis": redis_section})
    second = make_gateway(redis_url="", workers=1, sections={"redis": redis_section})
    first.route(ROUTES)
    with primary.client() as client:
        assert client.wait(1, 5000) == 1          # the directory reached the replica
    assert wait_until(lambda: _kick_reaches(first, 3), timeout=60)   # 3 workers subscribed
    return first, second


def test_kick_and_move_through_one_gateway_close_sessions_on_the_other(two_gateways):
    first, second = two_gateways
    held = try_login(second, ALICE, ALICE_PW)[0]
    held.select("INBOX")
    assert _command(first, "kick", ALICE).returncode == 0
    assert _bye(held) == KICKED
    carol = try_login(first, "carol@example.com", USERS_A["carol@example.com"])[0]
    carol.select("INBOX")
    second.route({**ROUTES, "carol@example.com": "B"})        # a move, through the other one
    assert _bye(carol) == MOVED


class LoginLoop:
    """Logs alice in over and over through both gateways; records (time, answer)."""

    def __init__(self, gateways):
        self.gateways = gateways
        self.results: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            gateway = self.gateways[turn % len(self.gateways)]
            turn += 1
            try:
                client, answer = try_login(gateway, ALICE, ALICE_PW)
                if client is not None:
                    client.logout()
            except (OSError, imaplib.IMAP4.abort) as exc:
                answer = f"connection: {exc}"
            self.results.append((time.monotonic(), answer))
            time.sleep(0.05)


def test_logins_survive_a_primary_failover(two_gateways, replicated):
    first, second = two_gateways
    primary, replica, sentinel = replicated
    loop = LoginLoop([first, second])
    loop.thread.start()
    try:
        assert wait_until(lambda: len(loop.results) >= 4)
        killed = time.monotonic()
        primary.stop(signal.SIGKILL)
        assert wait_until(lambda: sentinel.primary() == ("127.0.0.1", replica.port),
                          timeout=60), sentinel.log_text()[-3000:]
        promoted = time.monotonic()
        assert wait_until(lambda: [a for t, a in loop.results if t > killed and a == "OK"],
                          timeout=60)
        time.sleep(1.0)         # a few more logins after the first success
    finally:
        loop.stop.set()
        loop.thread.join(30)
    after = [(t, a) for t, a in loop.results if t > killed]
    wrong = [a for _, a in loop.results if a != "OK" and "UNAVAILABLE" not in a]
    assert not wrong, wrong          # never AUTHENTICATIONFAILED, never a dropped connection
    # (right after the kill a worker may still answer from its recent lookups, until it
    # notices that its subscription is gone: the window counts from the promotion on)
    first_ok = next(t for t, a in after if a == "OK" and t >= promoted)
    assert all(a == "OK" for t, a in after if t >= first_ok), after
    window = first_ok - killed
    print(f"\nfailover window: {window:.2f}s from SIGKILL of the primary to the first login "
          f"through the promoted replica; {sum(a != 'OK' for _, a in after)} logins answered "
          f"NO [UNAVAILABLE] meanwhile")
    # Kicks and moves reach every worker of both gateways again (subscribers reconnected).
    assert wait_until(lambda: _kick_reaches(second, 3), timeout=60)
    held = try_login(first, ALICE, ALICE_PW)[0]
    held.select("INBOX")
    assert _command(second, "kick", ALICE).returncode == 0
    assert _bye(held) == KICKED
