"""The health listener: /healthz 200 while serving, 503 while the gateway drains on TERM
(the session still open keeps working), 503 without Redis; the route table answers 404 /
405 / 400 for anything else."""
from __future__ import annotations

import http.client
import signal
import socket
import time


import servers
from conftest import USERS_A, require_binary

LISTENERS = {"imap": {"protocol": "imap"}, "health": {"protocol": "health"}}


def get(port: int, path: str = "/healthz", method: str = "GET") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until(predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def test_healthz_and_other_routes(make_gateway):
    gw = make_gateway(listeners=LISTENERS)
    assert get(gw.ports["health"]) == (200, b"ok\n")
    assert get(gw.ports["health"], "/healthz?verbose=1")[0] == 200
    assert get(gw.ports["health"], "/nope")[0] == 404
    assert get(gw.ports["health"], "/healthz", "POST")[0] == 405
    assert get(gw.ports["health"], "/healthz", "HEAD")[0] == 200
    with socket.create_connection(("127.0.0.1", gw.ports["health"]), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.0 400")
    assert gw.running


def test_healthz_is_503_while_draining_on_term(make_gateway):
    gw = make_gateway(listeners=LISTENERS, workers=1, routes={"alice@example.com": "A"},
                      server_overrides={"graceful_timeout": 60})
    import imaplib
    client = imaplib.IMAP4("127.0.0.1", gw.ports["imap"], timeout=30)
    client.login("alice@example.com", USERS_A["alice@example.com"])
    assert get(gw.ports["health"])[0] == 200
    gw.signal(signal.SIGTERM)
    assert wait_until(lambda: get(gw.ports["health"]) == (503, b"draining\n"))
    assert client.noop()[0] == "OK"          # the open session goes on meanwhile
    assert get(gw.ports["health"])[0] == 503
    client.logout()
    assert wait_until(lambda: not gw.running)


def test_healthz_stays_200_across_hup(make_gateway):
    gw = make_gateway(listeners=LISTENERS, workers=1)
    old = gw.worker_pids()
    gw.signal(signal.SIGHUP)
    statuses = set()

    def renewed():
        statuses.add(get(gw.ports["health"])[0])
        pids = gw.worker_pids()
        return pids and not set(pids) & set(old)
    assert wait_until(renewed)
    statuses.add(get(gw.ports["health"])[0])
    assert statuses == {200}


def test_healthz_is_503_without_redis(make_gateway, tmp_path):
    require_binary("redis-server", "redis-server")
    redis = servers.RedisServer(tmp_path / "redis")
    redis.start()
    try:
        gw = make_gateway(listeners=LISTENERS, redis_url=redis.url)
        assert get(gw.ports["health"])[0] == 200
    finally:
        redis.stop()
    status, body = get(gw.ports["health"])
    assert status == 503 and body.startswith(b"redis unavailable")
