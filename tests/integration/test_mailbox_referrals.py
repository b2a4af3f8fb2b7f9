"""RFC 2193 mailbox referrals followed by the gateway for clients that know nothing of them.

The home back-end is the scripted referral server (tests/referral_backend.py) in front of a
real Dovecot; the public folders it refers to live in a second real Dovecot.  The clients are
imaplib and imapclient, which have never heard of referrals.
"""
from __future__ import annotations

import hashlib
import imaplib
import socket
import time

import pytest
from imapclient import IMAPClient

import servers
from clients import converse, wait_for_exists
from helpers import Tripwire
from referral_fixtures import *  # noqa: F401,F403 - fixtures
from referral_fixtures import REF_PASSWORD, REF_USER, REF_USERS


def gateway_for(make_gateway, backend, ref_remote):
    return make_gateway(
        backends={"HOME": (backend.host, backend.port, backend.port),
                  "PUBLIC": (ref_remote.host, ref_remote.imap_port, ref_remote.pop3_port)},
        routes={user: "HOME" for user in REF_USERS})


@pytest.fixture
def gateway(make_gateway, referral_backend, ref_remote):
    return gateway_for(make_gateway, referral_backend, ref_remote)


def login(gateway) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=15)
    client.login(REF_USER, REF_PASSWORD)
    return client


def names(listing) -> set[str]:
    return {line.decode().rsplit(' "/" ', 1)[-1].strip('"') for line in listing if line}


def subjects(client: imaplib.IMAP4) -> list[str]:
    typ, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    return [part[1].decode().split(":", 1)[1].strip() for part in data if isinstance(part, tuple)]


def remote_count(ref_remote, folder: str) -> int:
    direct = ref_remote.imap(REF_USER)
    try:
        typ, data = direct.status(f'"{folder}"', "(MESSAGES)")
        assert typ == "OK"
        return int(data[0].split(b"MESSAGES ")[1].rstrip(b")"))
    finally:
        direct.logout()


def test_list_shows_home_and_remote_folders(gateway):
    client = login(gateway)
    try:
        typ, listing = client.list('""', '"*"')
        assert typ == "OK"
        assert {"INBOX", "public/news", "public/announcements"} <= names(listing)
        typ, listing = client.lsub('""', '"*"')
        assert typ == "OK"
    finally:
        client.logout()


def test_select_fetch_store_on_a_remote_folder_and_switch_back(gateway, ref_remote):
    client = login(gateway)
    try:
        typ, data = client.select("public/news")
        assert typ == "OK", data
        assert "public news" in subjects(client)
        typ, _ = client.store("1", "+FLAGS", "(\\Flagged)")
        assert typ == "OK"
        typ, data = client.search(None, "FLAGGED")
        assert typ == "OK" and data[0].split() == [b"1"]
        typ, _ = client.select("INBOX")
        assert typ == "OK"
        assert subjects(client) == ["home inbox"]
    finally:
        client.logout()
    direct = ref_remote.imap(REF_USER)
    try:
        direct.select("public/news")
        typ, data = direct.search(None, "FLAGGED")
        assert data[0].split() == [b"1"]       # the STORE really happened on the remote server
    finally:
        direct.logout()


@pytest.mark.parametrize("folder", ["public/announcements", "INBOX"])
def test_idle_sees_new_mail_at_home_and_on_a_remote_folder(gateway, ref_remote, ref_home,
                                                          folder):
    # INBOX: unsolicited home data reaches a client idling at home in routing mode.
    server = ref_home if folder == "INBOX" else ref_remote
    client = IMAPClient("127.0.0.1", port=gateway.imap_port, ssl=False, timeout=15)
    client.login(REF_USER, REF_PASSWORD)
    client.select_folder(folder)
    client.idle()
    try:
        server.deliver(REF_USER, f"Subject: idle-{time.time_ns()}\r\n\r\nx\r\n".encode(),
                       folder=folder)
        assert wait_for_exists(client)
    finally:
        client.idle_done()
        client.logout()


def test_append_and_status_on_a_remote_folder(gateway, ref_remote):
    before = remote_count(ref_remote, "public/news")
    client = login(gateway)
    try:
        message = b"Subject: appended through the gateway\r\n\r\nhello\r\n"
        typ, data = client.append("public/news", None, None, message)
        assert typ == "OK", data
        typ, data = client.status("public/news", "(MESSAGES)")
        assert typ == "OK"
        assert f"MESSAGES {before + 1}".encode() in data[0]
    finally:
        client.logout()
    assert remote_count(ref_remote, "public/news") == before + 1


def test_large_append_to_a_remote_folder_streams_byte_identical(gateway, ref_remote):
    marker = f"big-remote-{time.time_ns()}"
    message = (f"Subject: {marker}\r\n\r\n".encode() + (b"y" * 998 + b"\r\n") * 3000)
    client = login(gateway)
    try:
        typ, data = client.append("public/announcements", None, None, message)
        assert typ == "OK", data
        client.select("public/announcements")
        typ, found = client.search(None, "SUBJECT", f'"{marker}"')
        typ, data = client.fetch(found[0].split()[0], "(BODY.PEEK[])")
        assert hashlib.sha256(data[0][1]).digest() == hashlib.sha256(message).digest()
    finally:
        client.logout()


def test_copy_and_move_from_home_to_a_remote_folder(gateway, ref_remote, ref_home):
    marker = f"to-move-{time.time_ns()}"
    ref_home.deliver(REF_USER, f"Subject: {marker}\r\n\r\nm\r\n".encode())
    before = remote_count(ref_remote, "public/announcements")
    client = login(gateway)
    try:
        typ, data = client.select("INBOX")
        home_count = int(data[0])
        typ, data = client.copy("1", "public/announcements")
        assert typ == "OK", data
        typ, data = client.uid("SEARCH", None, "SUBJECT", f'"{marker}"')
        (uid,) = data[0].split()
        typ, data = client.uid("MOVE", uid.decode(), "public/announcements")
        assert typ == "OK", data
        typ, data = client.select("INBOX")
        assert int(data[0]) == home_count - 1
        typ, data = client.search(None, "SUBJECT", f'"{marker}"')
        assert data[0] == b""
    finally:
        client.logout()
    assert remote_count(ref_remote, "public/announcements") == before + 2
    direct = ref_remote.imap(REF_USER)
    try:
        direct.select("public/announcements")
        typ, data = direct.search(None, "SUBJECT", f'"{marker}"')
        assert len(data[0].split()) == 1
    finally:
        direct.logout()


def test_referral_to_a_host_not_allowed_is_refused_without_credentials(
        make_gateway, make_referral_backend, ref_remote):
    listener = socket.socket()
    listener.bind(("127.0.0.3", 0))
    listener.listen(4)
    backend = make_referral_backend(referral_host="127.0.0.3",
                                    referral_port=listener.getsockname()[1])
    gateway = gateway_for(make_gateway, backend, ref_remote)
    try:
        with Tripwire(listener) as tripwire:
            client = login(gateway)
            typ, data = client.select("public/news")
            assert typ == "NO"
            assert data[0].startswith(b"[UNAVAILABLE]")
            assert b"REFERRAL" not in data[0] and b"imap://" not in data[0]
            typ, _ = client.select("INBOX")            # the session goes on
            assert typ == "OK"
            client.logout()
    finally:
        listener.close()
    assert tripwire.seen == []
    assert "host not allowed" in gateway.log_text()


def test_referrals_never_reach_the_client(gateway):
    data = converse(gateway.imap_port,
                    f'a LOGIN {REF_USER} {REF_PASSWORD}\r\nb SELECT "public/news"\r\n'
                    f'c STATUS "public/announcements" (MESSAGES)\r\nd LIST "" "*"\r\n'
                    f'e SUBSCRIBE "public/news"\r\nf LOGOUT\r\n'.encode(), b"f")
    assert b"f OK" in data
    for tag in (b"a", b"b", b"c", b"d", b"e"):
        assert b"\r\n" + tag + b" OK" in data or data.startswith(tag + b" OK"), data
    assert b"REFERRAL" not in data.upper()
    assert b"MAILBOX-REFERRALS" not in data


def test_referral_capable_client_may_see_referrals_when_configured(
        make_gateway, referral_backend, ref_remote):
    gateway = make_gateway(
        backends={"HOME": (referral_backend.host, referral_backend.port, referral_backend.port),
                  "PUBLIC": (ref_remote.host, ref_remote.imap_port, ref_remote.pop3_port)},
        routes={REF_USER: "HOME"}, sections={"referrals": {"pass_to_capable_clients": True}})
    data = converse(gateway.imap_port,
                    f'a LOGIN {REF_USER} {REF_PASSWORD}\r\nb RLIST "" "*"\r\n'
                    f'c SELECT "public/news"\r\nd LOGOUT\r\n'.encode(), b"d")
    assert b"MAILBOX-REFERRALS" in data.split(b"\r\n")[0] + data.split(b"\r\n")[1]
    assert b"c NO [REFERRAL imap://" in data      # a capable client follows it itself


def test_replicas_in_one_referral_are_tried_in_order(make_gateway, make_referral_backend,
                                                    ref_remote):
    dead_port = servers.free_port()            # an allowed back-end that is down
    backend = make_referral_backend(dead_replicas=[("127.0.0.1", dead_port)])
    gateway = make_gateway(
        backends={"HOME": (backend.host, backend.port, backend.port),
                  "DOWN": ("127.0.0.1", dead_port, dead_port),
                  "PUBLIC": (ref_remote.host, ref_remote.imap_port, ref_remote.pop3_port)},
        routes={REF_USER: "HOME"})
    client = login(gateway)
    try:
        typ, data = client.select("public/news")
        assert typ == "OK", data
        assert "public news" in subjects(client)
    finally:
        client.logout()
    assert "referred server DOWN unavailable" in gateway.log_text()
