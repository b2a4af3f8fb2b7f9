"""Submission over TLS with smtplib: STARTTLS on the submission port (required before AUTH),
implicit TLS (SMTPS, RFC 8314), the STARTTLS injection class, the relay after AUTH over TLS,
and TLS from the gateway to the back-end's submission service."""
from __future__ import annotations

import hashlib
import smtplib
import socket
import ssl
import time

import pytest

import servers
from certs import TestCA
from clients import unique_message
from conftest import USERS_A, USERS_B
from test_smtp_proxy import (  # noqa: F401 - mail_system is a fixture used here too
    SmtpRaw, backend_table, body_of, mail_system, plain, wait_for_message,
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("smtp-ca"))


@pytest.fixture(scope="module")
def tls_backend(tmp_path_factory, mail_system, ca):
    """A third Dovecot (B's users) whose submission service offers STARTTLS with a
    certificate of the test CA; it relays to the same Postfix."""
    cert, key = ca.issue("backend", ["127.0.0.1"])
    mta = mail_system[2]
    dovecot = servers.Dovecot(tmp_path_factory.mktemp("smtp-dovecot-tls"), "T", USERS_B,
                              submission_relay=(mta.host, mta.port), ssl_files=(cert, key))
    dovecot.start()
    try:
        yield dovecot
    finally:
        dovecot.stop()


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory, redis_server, mail_system, ca, tls_backend):
    dovecot_a, dovecot_b, _ = mail_system
    cert, key = ca.issue("gateway", ["mail.example.test", "127.0.0.1", "localhost"])
    gw = servers.GatewayProcess(
        tmp_path_factory.mktemp("smtp-tls-gateway"), redis_url=redis_server.allocate_db(),
        backends={"A": backend_table(dovecot_a), "B": backend_table(dovecot_b),
                  "T": {**backend_table(tls_backend), "tls": "starttls",
                        "tls_ca_file": str(ca.path)},
                  "T-WRONG-NAME": {**backend_table(tls_backend), "tls": "starttls",
                                   "tls_ca_file": str(ca.path),
                                   "tls_verify_name": "other.example.test"}},
        listeners={"imap": {"protocol": "imap"},
                   "submission": {"protocol": "submission", "tls": "starttls",
                                  "require_tls_for_login": True},
                   "smtps": {"protocol": "submission", "tls": "implicit"}},
        sections={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    try:
        gw.start()
        gw.route({**{u: "A" for u in USERS_A}, "bob@example.com": "B",
                  "dave@example.com": "T"})
        yield gw
    finally:
        gw.stop()


def context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.check_hostname = False     # the address is an IP; the chain is still verified
    return ctx


def test_starttls_then_auth_and_send(tls_gateway, ca):
    marker = f"starttls-{time.time_ns()}"
    with smtplib.SMTP("127.0.0.1", tls_gateway.submission_port, timeout=30) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.login("bob@example.com", "bob-secret")     # no AUTH offered before TLS
        assert client.starttls(context=context(ca))[0] == 220
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        client.login("bob@example.com", "bob-secret")
        assert client.sendmail("bob@example.com", ["alice@example.com"],
                               unique_message(marker)) == {}
    assert body_of(wait_for_message(tls_gateway, "alice@example.com", marker)) == b"hello\r\n"


def test_auth_and_mail_refused_before_starttls(tls_gateway):
    raw = SmtpRaw(tls_gateway.submission_port)
    raw.command(b"EHLO client")
    assert raw.command(b"AUTH PLAIN " + plain("bob@example.com", "bob-secret")) == \
        [b"530 5.7.0 Must issue a STARTTLS command first"]
    assert raw.command(b"MAIL FROM:<bob@example.com>")[0].startswith(b"530 5.7.0")
    raw.close()


def test_implicit_tls_carries_a_big_message(tls_gateway, ca):
    marker = f"smtps-{time.time_ns()}"
    message = unique_message(marker, 5 * 1024 * 1024)
    with smtplib.SMTP_SSL("127.0.0.1", tls_gateway.ports["smtps"], timeout=60,
                          context=context(ca)) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        client.login("carol@example.com", "carol-secret")
        assert client.sendmail("carol@example.com", ["alice@example.com"], message) == {}
    delivered = wait_for_message(tls_gateway, "alice@example.com", marker, timeout=120)
    assert hashlib.sha256(body_of(delivered)).digest() == \
        hashlib.sha256(body_of(message)).digest()


def test_plaintext_pipelined_behind_starttls_is_dropped(tls_gateway, ca):
    """RFC 3207 §4.2 / CVE-2011-0411 class: an AUTH sent in clear behind STARTTLS must not
    be answered after the handshake."""
    sock = socket.create_connection(("127.0.0.1", tls_gateway.submission_port), timeout=15)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    sock.sendall(b"EHLO client\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    sock.sendall(b"STARTTLS\r\nAUTH PLAIN " + plain("bob@example.com", "bob-secret") + b"\r\n")
    assert reader.readline().startswith(b"220 2.0.0")
    secure = context(ca).wrap_socket(sock, server_hostname="127.0.0.1")
    secure.sendall(b"NOOP\r\n")
    answer = secure.recv(4096)
    assert answer == b"250 2.0.0 OK\r\n", answer     # the NOOP's answer, nothing before it
    secure.sendall(b"AUTH PLAIN " + plain("bob@example.com", "bob-secret") + b"\r\n")
    assert secure.recv(4096).startswith(b"503 5.5.1")  # EHLO again first, as RFC 3207 says
    secure.close()


def test_tls_to_the_backend_submission_service(tls_gateway, tls_backend, ca):
    """dave's back-end is reached with STARTTLS, its certificate checked against the CA."""
    marker = f"backend-tls-{time.time_ns()}"
    with smtplib.SMTP_SSL("127.0.0.1", tls_gateway.ports["smtps"], timeout=30,
                          context=context(ca)) as client:
        client.login("dave@example.com", "dave-secret")
        assert client.sendmail("dave@example.com", ["alice@example.com"],
                               unique_message(marker)) == {}
    wait_for_message(tls_gateway, "alice@example.com", marker)
    logins = [line for line in tls_backend.log_text().splitlines()
              if "submission-login" in line and "user=<dave@example.com>" in line]
    assert logins and all(", TLS" in line for line in logins), logins


def test_backend_certificate_of_the_wrong_name_is_a_temporary_failure(tls_gateway, ca):
    tls_gateway.route({**{u: "A" for u in USERS_A}, "bob@example.com": "T-WRONG-NAME",
                       "dave@example.com": "T"})
    try:
        with smtplib.SMTP_SSL("127.0.0.1", tls_gateway.ports["smtps"], timeout=30,
                              context=context(ca)) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login("bob@example.com", "bob-secret")
        assert refused.value.smtp_code == 454
        assert "certificate does not name" in tls_gateway.log_text()
    finally:
        tls_gateway.route({**{u: "A" for u in USERS_A}, "bob@example.com": "B",
                           "dave@example.com": "T"})
