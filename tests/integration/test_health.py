"""The health listener: /healthz 200 while serving, 503 while the gateway drains on TERM
(the session still open keeps working), 503 without Redis; the route table answers 404 /
405 / 400 for anything else."""
from __future__ import annotations

import http.client
import signal
import socket
import threading


import servers
from helpers import wait_until
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


def test_health_requests_during_hup_are_all_answered(make_gateway):
    """A balancer's checks keep arriving while the old workers retire: each connection gets
    its answer (200), none is closed unanswered by a worker on its way out."""
    gw = make_gateway(listeners=LISTENERS, workers=2)
    old = wait_until(lambda: (p := gw.worker_pids()) and len(p) == 2 and p)
    answers, errors, stop = [], [], threading.Event()

    def check(path):
        while not stop.is_set():
            try:
                answers.append(get(gw.ports["health"], path)[0])
            except (OSError, http.client.HTTPException) as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=check, args=(path,))
               for path in ("/healthz", "/healthz", "/metrics")]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: len(answers) >= 10)
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: (p := gw.worker_pids()) and len(p) == 2
                          and not set(p) & set(old) and all(not alive(pid) for pid in old))
        settled = len(answers)
        assert wait_until(lambda: len(answers) >= settled + 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    log = gw.log_text()
    failed = log[log.find("health request failed"):][:3000] if "request failed" in log else ""
    assert errors == [], (errors, failed)
    assert set(answers) == {200}, failed


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
