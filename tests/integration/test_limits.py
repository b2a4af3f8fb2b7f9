"""Limits shared through Redis by two gateway processes, failed-login throttling, and the
per-worker connection cap."""
from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from clients import LineClient
from conftest import USERS_A, USERS_B
from ops_helpers import pop_login, try_login, wait_until

ALICE, ALICE_PW = "alice@example.com", USERS_A["alice@example.com"]


@pytest.fixture
def two_gateways(make_gateway, redis_server):
    """Two gateway instances on one Redis database (one directory, one set of limits)."""
    def make(limits: dict, **kwargs):
        shared = redis_server.allocate_db()
        first = make_gateway(redis_url=shared, sections={"limits": limits}, workers=2,
                             **kwargs)
        second = make_gateway(redis_url=shared, sections={"limits": limits}, workers=1,
                              **kwargs)
        first.route({ALICE: "A", "carol@example.com": "A", "bob@example.com": "B",
                     "dave@example.com": "B"})
        return first, second
    return make


def test_per_login_limit_counts_sessions_on_both_gateways(two_gateways):
    first, second = two_gateways({"max_connections_per_login": 2})
    one, _ = try_login(first, ALICE, ALICE_PW)
    two, _ = try_login(second, ALICE, ALICE_PW)
    assert one and two
    for gateway in (first, second):
        refused, answer = try_login(gateway, ALICE, ALICE_PW)
        assert refused is None and "[LIMIT]" in answer
    other, _ = try_login(first, "bob@example.com", USERS_B["bob@example.com"])
    assert other is not None               # the limit is per login name
    one.logout()                           # a session that ends frees its place
    three = wait_until(lambda: try_login(second, ALICE, ALICE_PW)[0])
    assert three is not None
    assert "event=login-failed" in first.log_text() and "reason=limit" in first.log_text()
    for client in (two, three, other):
        client.logout()


def test_per_address_limit_counts_sessions_on_both_gateways(two_gateways):
    first, second = two_gateways({"max_connections_per_address": 3})
    held = [try_login(first, ALICE, ALICE_PW)[0],
            try_login(second, "bob@example.com", USERS_B["bob@example.com"])[0],
            try_login(first, "carol@example.com", USERS_A["carol@example.com"])[0]]
    assert all(held)
    refused, answer = try_login(second, "dave@example.com", USERS_B["dave@example.com"])
    assert refused is None and "[LIMIT]" in answer
    # Another client address is not affected.
    elsewhere, _ = try_login(second, "dave@example.com", USERS_B["dave@example.com"],
                             source="127.0.0.2")
    assert elsewhere is not None
    # POP3 says it in its own words (RFC 2449 [IN-USE]).
    with pytest.raises(Exception, match=r"IN-USE"):
        pop_login(first, "dave@example.com", USERS_B["dave@example.com"])
    for client in held + [elsewhere]:
        client.logout()


def test_failed_logins_are_slowed_then_refused_but_not_from_elsewhere(two_gateways):
    first, second = two_gateways({"auth_failures_per_login": 8, "auth_failures_per_address": 50,
                                  "auth_failure_max_delay": 0.4},
                                 server_overrides={"auth_failure_delay": 0.02})
    answers = []
    for attempt in range(20):
        gateway = first if attempt % 2 else second      # failures count across both
        answers.append(try_login(gateway, ALICE, "not-the-password")[1])
        if attempt == 12:
            # The real user, from another address, logs in at once, on either gateway.
            for gateway in (first, second):
                client, answer = try_login(gateway, ALICE, ALICE_PW, source="127.0.0.2")
                assert client is not None, answer
                client.logout()
    failed = [a for a in answers if "AUTHENTICATIONFAILED" in a]
    refused = [a for a in answers if "[LIMIT]" in a]
    assert len(failed) == 8 and len(refused) == 12, answers
    assert answers.index(refused[0]) == 8       # refused from the 9th attempt on
    # The answer to each failure waited longer than the one before (up to the maximum).
    delays = [float(m) for m in re.findall(r"event=login-failed .*reason=auth-failed .*"
                                           r"delay=([0-9.]+)", first.log_text()
                                           + second.log_text())]
    assert sorted(delays) == [0.02, 0.04, 0.08, 0.16, 0.32, 0.4, 0.4, 0.4]
    # Even the right password is refused from the attacking address, until the window ends.
    assert "[LIMIT]" in try_login(first, ALICE, ALICE_PW)[1]
    # Another user from the same address is not locked out (address count 8 < 50).
    client, _ = try_login(first, "bob@example.com", USERS_B["bob@example.com"])
    assert client is not None
    client.logout()


def test_success_clears_the_pair_count_and_trusted_networks_are_exempt(two_gateways):
    first, _ = two_gateways({"auth_failures_per_login": 3,
                             "trusted_networks": ["127.0.0.2/32"]})
    for _ in range(2):
        assert "AUTHENTICATIONFAILED" in try_login(first, ALICE, "wrong")[1]
    client, _ = try_login(first, ALICE, ALICE_PW)      # resets alice's count from here
    client.logout()
    for _ in range(2):
        assert "AUTHENTICATIONFAILED" in try_login(first, ALICE, "wrong")[1]
    for _ in range(6):   # a trusted address is never throttled
        assert "AUTHENTICATIONFAILED" in try_login(first, ALICE, "wrong", source="127.0.0.2")[1]


def test_worker_max_connections_refuses_with_bye(make_gateway):
    """[server] max_connections per worker: logged-in sessions count; one more connection
    is greeted with BYE and a log line (before login the gevent pool of the same size also
    stops accepting, so the kernel queues the connection)."""
    gateway = make_gateway(workers=1, server_overrides={"max_connections": 2},
                           routes={ALICE: "A"})
    held = [try_login(gateway, ALICE, ALICE_PW)[0] for _ in range(2)]
    assert all(held)
    extra = LineClient(gateway.imap_port)
    assert extra.greeting.startswith(b"* BYE")
    assert extra.closed()
    assert wait_until(lambda: "event=refused" in gateway.log_text())
    held.pop().logout()
    waiting = [LineClient(gateway.imap_port)]
    assert waiting[0].greeting.startswith(b"* OK")
    # Full again (one logged in, one before login): the next one is turned away too.
    again = LineClient(gateway.imap_port)
    assert again.greeting.startswith(b"* BYE")
    again.close()
    waiting[0].close()
    held[0].logout()
    extra.close()


def test_counts_of_a_killed_gateway_expire(two_gateways):
    """A host that dies without releasing its sessions' counts blocks nobody for longer
    than session_ttl."""
    first, second = two_gateways({"max_connections_per_login": 1, "session_ttl": 2})
    held, _ = try_login(first, ALICE, ALICE_PW)
    assert held is not None
    assert "[LIMIT]" in try_login(second, ALICE, ALICE_PW)[1]
    os.killpg(first.pid, signal.SIGKILL)   # master and workers at once: nothing released
    first.stop()
    held.shutdown()
    later = wait_until(lambda: try_login(second, ALICE, ALICE_PW)[0], timeout=30)
    assert later is not None
    later.logout()


def test_redis_commands_of_successful_logins(make_gateway, tmp_path):
    """As Redis's MONITOR sees it (commands a script runs inside are shown as "lua"): from
    an address without failed logins, a login whose route the worker has seen runs no
    script at all; from an address with failures, throttle check and lookup are one EVALSHA
    per login."""
    import servers
    redis = servers.RedisServer(tmp_path / "redis").start()
    try:
        gateway = make_gateway(redis_url=redis.url, workers=1, routes={ALICE: "A"})
        with redis.client() as client:   # the worker hears of failures from here on
            assert wait_until(lambda: client.pubsub_numsub("mailgate:moves")[0][1] >= 1)
        for _ in range(2):          # warm-up: connection set-up, script loading, the route
            try_login(gateway, ALICE, ALICE_PW)[0].logout()
        commands = monitored_logins(redis, gateway, 5)
        assert commands.count("EVALSHA") <= 1, commands
        assert "AUTHENTICATIONFAILED" in try_login(gateway, ALICE, "wrong")[1]
        # The first success loads the script and clears the pair's count (HDEL); the
        # address's count stays, so the address is checked from then on.
        try_login(gateway, ALICE, ALICE_PW)[0].logout()
        commands = monitored_logins(redis, gateway, 3)
        assert commands.count("EVALSHA") == 3, commands
    finally:
        redis.stop()


def monitored_logins(redis, gateway, count: int) -> list[str]:
    """The commands (first words) Redis received from clients during ``count`` logins (the
    gateway's background work, e.g. a master's GET of the generation, may be among them)."""
    import threading
    seen, ready, stop = [], threading.Event(), threading.Event()

    def watch():
        with redis.client() as client, client.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                if stop.is_set():       # the logins are done; wait for the marker
                    if "mailgate:stop" in command["command"]:
                        return
                    continue
                if command.get("client_type") != "lua":
                    seen.append(command["command"])
    thread = threading.Thread(target=watch)
    thread.start()
    assert ready.wait(10)
    time.sleep(0.2)             # MONITOR is registered once the server answered OK
    for _ in range(count):
        try_login(gateway, ALICE, ALICE_PW)[0].logout()
    stop.set()
    with redis.client() as client:
        client.get("mailgate:stop")
    thread.join(10)
    return [c.split()[0].upper() for c in seen]


def test_an_ipv6_client_is_its_64_for_throttling(make_gateway):
    """One subscriber holds a whole /64 and may pick a new address for every connection:
    throttling counts the /64 ([limits] ipv6_prefix).  The addresses come in PROXY headers,
    as a load balancer sends them."""
    gateway = make_gateway(
        routes={ALICE: "A"},
        listeners={"imap": {"protocol": "imap", "proxy_protocol": True}},
        sections={"limits": {"auth_failures_per_login": 2, "auth_failure_max_delay": 0.1}},
        server_overrides={"auth_failure_delay": 0.01})

    def answer(source: str, password: str) -> bytes:
        with socket.create_connection(("127.0.0.1", gateway.ports["imap"]), timeout=15) as raw:
            raw.sendall(b"PROXY TCP6 %s ::1 40000 143\r\na LOGIN %s \"%s\"\r\n"
                        % (source.encode(), ALICE.encode(), password.encode()))
            data = b""
            while b"\r\na " not in data:
                piece = raw.recv(4096)
                assert piece, data
                data += piece
            return data.split(b"\r\na ", 1)[1]

    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b"):        # two addresses, one /64
        assert b"AUTHENTICATIONFAILED" in answer(host, "wrong")
    assert b"[LIMIT]" in answer("2001:db8:1:2:ffff::c", ALICE_PW)   # a third: still refused
    assert answer("2001:db8:1:3::a", ALICE_PW).startswith(b"OK")    # the next /64 is not
