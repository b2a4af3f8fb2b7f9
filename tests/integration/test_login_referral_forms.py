"""RFC 2221 login referral forms Dovecot cannot produce, from the scripted back-end
(tests/referral_backend.py): a ``* BYE [REFERRAL]`` greeting and ``OK [REFERRAL]`` after a
successful login; and the capability list a client sees after login, in both relays."""
from __future__ import annotations

import imaplib
import time

import pytest

from clients import ImapRaw
from referral_fixtures import *  # noqa: F401,F403 - fixtures
from referral_fixtures import REF_PASSWORD, REF_USER, REF_USERS

HIDDEN = {"LOGIN-REFERRALS", "MAILBOX-REFERRALS", "SASL-IR", "STARTTLS", "LOGINDISABLED"}


def gateway_for(make_gateway, backend, ref_remote, **kwargs):
    return make_gateway(
        backends={"HOME": (backend.host, backend.port, backend.port),
                  "PUBLIC": (ref_remote.host, ref_remote.imap_port, ref_remote.pop3_port)},
        routes={user: "HOME" for user in REF_USERS}, **kwargs)


def session_line(gateway, login: str, timeout: float = 10) -> str:
    """The session's end line in the gateway log (written after the client logs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gateway.log_text().splitlines():
            if f"login={login}" in line and " end=" in line:
                return line
        time.sleep(0.05)
    raise AssertionError("no session line")


def test_bye_referral_greeting_is_followed(make_gateway, make_referral_backend, ref_remote):
    url = f"imap://{ref_remote.host}:{ref_remote.imap_port}/"
    backend = make_referral_backend(greeting_referral=url)
    gateway = gateway_for(make_gateway, backend, ref_remote)
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=15)
    client.login(REF_USER, REF_PASSWORD)
    assert client.select("INBOX")[0] == "OK"
    client.logout()
    assert "backend=PUBLIC" in session_line(gateway, REF_USER)


def test_ok_referral_is_followed(make_gateway, make_referral_backend, ref_remote):
    url = f"imap://{ref_remote.host}:{ref_remote.imap_port}/"
    backend = make_referral_backend(login_referral=url)
    gateway = gateway_for(make_gateway, backend, ref_remote)
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=15)
    typ, data = client.login(REF_USER, REF_PASSWORD)
    assert typ == "OK" and b"REFERRAL" not in data[0]
    client.logout()
    assert "backend=PUBLIC" in session_line(gateway, REF_USER)


def test_ok_referral_to_a_refused_host_keeps_the_working_login(
        make_gateway, make_referral_backend, ref_remote):
    backend = make_referral_backend(login_referral="imap://forbidden.example.net/")
    gateway = gateway_for(make_gateway, backend, ref_remote)
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=15)
    typ, data = client.login(REF_USER, REF_PASSWORD)
    assert typ == "OK" and b"REFERRAL" not in data[0]
    # The OK [REFERRAL] carried no capability list: the gateway asked for the logged-in one.
    assert b"NAMESPACE" in data[0]
    assert client.noop()[0] == "OK"
    client.logout()
    assert "backend=HOME" in session_line(gateway, REF_USER)
    assert "host not allowed" in gateway.log_text()


def login_and_capability(port: int, user: str, password: str) -> tuple[set[str], set[str]]:
    raw = ImapRaw(port, timeout=15)
    raw.send(b'a LOGIN "%s" "%s"\r\nb CAPABILITY\r\nc LOGOUT\r\n' % (user.encode(),
                                                                     password.encode()))
    ok = raw.until_tagged(b"a")[-1]
    assert ok.startswith(b"a OK [CAPABILITY ")
    at_login = set(ok[len(b"a OK [CAPABILITY "):ok.index(b"]")].decode().split())
    lines = raw.until_tagged(b"b")
    listed = [line for line in lines if line.startswith(b"* CAPABILITY ")]
    assert len(listed) == 1 and lines[-1].startswith(b"b OK")
    return at_login, set(listed[0][len(b"* CAPABILITY "):].decode().split())


def test_capability_after_login_is_the_login_list(gateway):
    """Plain relay to Dovecot: CAPABILITY later says what the login's OK said."""
    at_login, later = login_and_capability(gateway.imap_port, "alice@example.com",
                                           "alice-secret")
    assert at_login == later
    assert not {word.upper() for word in later} & HIDDEN
    assert not any(word.upper().startswith(("AUTH=", "COMPRESS=")) for word in later)


@pytest.mark.parametrize("passthrough", [False, True])
def test_capability_in_routing_mode_hides_mailbox_referrals(
        make_gateway, referral_backend, ref_remote, passthrough):
    gateway = gateway_for(make_gateway, referral_backend, ref_remote,
                          sections={"referrals": {"pass_to_capable_clients": passthrough}})
    at_login, later = login_and_capability(gateway.imap_port, REF_USER, REF_PASSWORD)
    assert at_login == later
    assert ("MAILBOX-REFERRALS" in later) is passthrough
