"""RFC 2221 login referrals, issued by a real Dovecot and followed by the gateway.

Dovecot answers a login with ``NO [REFERRAL imap://user;AUTH=PLAIN@host:port/]`` when its
passdb says ``nologin=y host=... port=...`` without ``proxy``.  The gateway must follow such
a referral itself, replay the login there, and never send credentials to a host outside
the allow-list.
"""
from __future__ import annotations

import imaplib
import socket
import time

import pytest

import servers
from helpers import Tripwire

PASSWORD = "ref-secret"
USERS = ["ref@example.com", "stray@example.com", "loop@example.com", "far@example.com"]


@pytest.fixture(scope="module")
def referral_dovecots(tmp_path_factory):
    """home: holds every mailbox.  R1 refers each user somewhere; R2 refers back to R1."""
    home = servers.Dovecot(tmp_path_factory.mktemp("ref-home"), "home",
                           {user: PASSWORD for user in USERS})
    r1 = servers.Dovecot(tmp_path_factory.mktemp("ref-r1"), "R1", {user: PASSWORD for user in USERS})
    r2 = servers.Dovecot(tmp_path_factory.mktemp("ref-r2"), "R2", {user: PASSWORD for user in USERS})
    for server in (home, r1, r2):
        server.imap_port, server.pop3_port = servers.free_port(), servers.free_port()
    forbidden = socket.socket()
    forbidden.bind(("127.0.0.2", 0))
    forbidden.listen(8)
    r1.passdb_extra = {
        "ref@example.com": f"nologin=y host=127.0.0.1 port={home.imap_port}",
        "stray@example.com": f"nologin=y host=127.0.0.2 port={forbidden.getsockname()[1]}",
        "loop@example.com": f"nologin=y host=127.0.0.1 port={r2.imap_port}",
        "far@example.com": f"nologin=y host=127.0.0.1 port={r2.imap_port}",
    }
    r2.passdb_extra = {
        "loop@example.com": f"nologin=y host=127.0.0.1 port={r1.imap_port}",
        "far@example.com": f"nologin=y host=127.0.0.1 port={home.imap_port}",
    }
    started = []
    try:
        for server in (home, r1, r2):
            server.start()
            started.append(server)
        yield home, r1, r2, forbidden
    finally:
        forbidden.close()
        for server in started:
            server.stop()


def referral_gateway_process(tmp_path_factory, redis_server, referral_dovecots,
                             max_hops: int) -> servers.GatewayProcess:
    """A gateway (not started) with HOME, R1 and R2 as back-ends."""
    home, r1, r2, _ = referral_dovecots
    return servers.GatewayProcess(
        tmp_path_factory.mktemp("ref-gateway"), redis_url=redis_server.allocate_db(),
        backends={name: (s.host, s.imap_port, s.pop3_port)
                  for name, s in (("HOME", home), ("R1", r1), ("R2", r2))},
        sections={"referrals": {"max_hops": max_hops}})


@pytest.fixture(scope="module")
def referral_gateway(tmp_path_factory, redis_server, referral_dovecots):
    gateway = referral_gateway_process(tmp_path_factory, redis_server, referral_dovecots, 3)
    try:
        gateway.start()
        gateway.route({user: "R1" for user in USERS})
        yield gateway
    finally:
        gateway.stop()


def login(gateway, user):
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=15)
    try:
        client.login(user, PASSWORD)
    except imaplib.IMAP4.error as exc:
        client.shutdown()
        return None, exc.args[0]
    return client, None


def test_login_referral_is_followed_to_the_referred_backend(referral_gateway, referral_dovecots):
    home = referral_dovecots[0]
    marker = f"referred-{time.time_ns()}"
    home.deliver("ref@example.com", f"Subject: {marker}\r\n\r\nhi\r\n".encode())
    client, error = login(referral_gateway, "ref@example.com")
    assert error is None
    try:
        client.select("INBOX")
        typ, data = client.search(None, "SUBJECT", f'"{marker}"')
        assert typ == "OK" and len(data[0].split()) == 1
    finally:
        client.logout()


def test_two_hops_are_followed(referral_gateway):
    client, error = login(referral_gateway, "far@example.com")
    assert error is None
    client.logout()


def test_wrong_password_at_the_referrer_is_a_plain_failure(referral_gateway):
    client = imaplib.IMAP4("127.0.0.1", referral_gateway.imap_port, timeout=15)
    with pytest.raises(imaplib.IMAP4.error) as failure:
        client.login("ref@example.com", "wrong")
    assert b"[AUTHENTICATIONFAILED]" in failure.value.args[0]
    assert b"REFERRAL" not in failure.value.args[0]


def test_referral_loop_is_detected(referral_gateway):
    client, error = login(referral_gateway, "loop@example.com")
    assert client is None
    assert error.startswith(b"[UNAVAILABLE]")
    assert b"REFERRAL" not in error and b"imap://" not in error
    assert "referral loop" in referral_gateway.log_text()


def test_referral_to_a_host_not_allowed_is_refused_and_gets_no_credentials(
        referral_gateway, referral_dovecots):
    with Tripwire(referral_dovecots[3]) as tripwire:
        client, error = login(referral_gateway, "stray@example.com")
    assert client is None
    assert error.startswith(b"[UNAVAILABLE]")
    assert tripwire.seen == []
    assert "host not allowed" in referral_gateway.log_text()


def test_max_hops_cuts_off_a_longer_chain(tmp_path_factory, redis_server, referral_dovecots):
    """far@ needs two hops (R1 → R2 → home); with max_hops = 1 the second is not followed."""
    gateway = referral_gateway_process(tmp_path_factory, redis_server, referral_dovecots, 1)
    try:
        gateway.start()
        gateway.route({"far@example.com": "R1", "ref@example.com": "R1"})
        client, error = login(gateway, "far@example.com")
        assert client is None and error.startswith(b"[UNAVAILABLE]")
        assert b"REFERRAL" not in error
        assert "(not followed)" in gateway.log_text()
        client, error = login(gateway, "ref@example.com")     # one hop is still fine
        assert error is None
        client.logout()
    finally:
        gateway.stop()
