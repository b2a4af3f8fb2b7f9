"""TLS from the gateway to back-ends ([backends.NAME] tls = starttls | implicit) against a
real Dovecot with ssl = yes and a certificate from a test CA: logins and the relay work,
a wrong name or an unknown CA is refused with NO [UNAVAILABLE] / -ERR [SYS/TEMP] and a log
line naming the back-end and the reason."""
from __future__ import annotations

import imaplib
import poplib
import time

import pytest

import servers
from certs import TestCA
from clients import unique_message
from conftest import require_binary

USER, PASSWORD = "tina@example.com", "tina-secret"


@pytest.fixture(scope="module")
def tls_dovecot(tmp_path_factory):
    require_binary("dovecot", "dovecot-imapd dovecot-pop3d")
    ca = TestCA(tmp_path_factory.mktemp("backend-ca"))
    cert, key = ca.issue("dovecot", ["backend.example.test", "127.0.0.1"])
    server = servers.Dovecot(tmp_path_factory.mktemp("dovecot-tls"), "T", {USER: PASSWORD},
                             ssl_files=(cert, key))
    server.start()
    try:
        yield server, ca
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_server, tls_dovecot):
    dovecot, ca = tls_dovecot
    other_ca = TestCA(tmp_path_factory.mktemp("other-ca"), "someone else's CA")
    base = {"address": "127.0.0.1", "imap_port": dovecot.imap_port,
            "pop3_port": dovecot.pop3_port, "tls": "starttls", "tls_ca_file": str(ca.path)}
    backends = {
        "starttls": base,
        "implicit": {**base, "tls": "implicit", "imap_port": dovecot.imaps_port,
                     "pop3_port": dovecot.pop3s_port},
        "named": {**base, "tls_verify_name": "backend.example.test"},
        "wrongname": {**base, "tls_verify_name": "wrong.example.test"},
        "wrongca": {**base, "tls_ca_file": str(other_ca.path)},
    }
    gw = servers.GatewayProcess(tmp_path_factory.mktemp("gateway"), backends=backends,
                                redis_url=redis_server.allocate_db())
    gw.start()
    gw.route({f"{name}@example.com": (name, USER) for name in backends})
    try:
        yield gw
    finally:
        gw.stop()


@pytest.mark.parametrize("name", ["starttls", "implicit", "named"])
def test_imap_and_pop3_over_backend_tls(gateway, tls_dovecot, name):
    dovecot, _ = tls_dovecot
    dovecot.deliver(USER, unique_message(f"backend-tls-{name}", 300_000))
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=30)
    try:
        assert client.login(f"{name}@example.com", PASSWORD)[0] == "OK"
        typ, data = client.select("INBOX")
        assert typ == "OK"
        typ, fetched = client.fetch(data[0], "(BODY.PEEK[])")
        assert typ == "OK" and b"backend-tls-" in fetched[0][1]
    finally:
        client.logout()
    pop = poplib.POP3("127.0.0.1", gateway.pop3_port, timeout=30)
    try:
        pop.user(f"{name}@example.com")
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        assert pop.stat()[0] >= 1
    finally:
        pop.quit()
    # Dovecot saw a TLS connection from the gateway.
    deadline = time.monotonic() + 10
    while "TLS" not in dovecot.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("name,reason", [("wrongname", "does not name 'wrong.example.test'"),
                                         ("wrongca", "certificate verify failed")])
def test_failed_verification_is_unavailable_and_logged(gateway, name, reason):
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=30)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            client.login(f"{name}@example.com", PASSWORD)
    finally:
        client.logout()
    pop = poplib.POP3("127.0.0.1", gateway.pop3_port, timeout=30)
    try:
        pop.user(f"{name}@example.com")
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            pop.pass_(PASSWORD)
    finally:
        pop.quit()
    deadline = time.monotonic() + 10
    while not any(f"event=backend-tls-refused backend={name} tls=starttls" in line
                  and reason in line
                  for line in gateway.log_text().splitlines()):
        assert time.monotonic() < deadline, gateway.log_text()[-3000:]
        time.sleep(0.05)
    assert PASSWORD not in gateway.log_text()
