"""RFC 2193 mailbox referrals through the gateway: COPY/MOVE in every direction, what a
referred server lacks, mailbox commands on remote folders, and keeping the home connection
alive (IDLE at home: test_mailbox_referrals.py; LIST forms: test_referral_listing.py).

Home is the scripted referral server (tests/referral_backend.py) in front of a real Dovecot;
"public/..." lives on a second real Dovecot and "archive/old" on a third one that offers
few capabilities and knows the folder as "old".  Clients are imaplib and imapclient.
"""
from __future__ import annotations

import imaplib
import re
import time

import pytest

from referral_fixtures import *  # noqa: F401,F403 - fixtures
from referral_fixtures import ARCHIVE_FOLDER, REF_PASSWORD, REF_USER, routed_gateway


@pytest.fixture
def gateway(archive_gateway):
    return archive_gateway


def login(gateway) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=15)
    client.login(REF_USER, REF_PASSWORD)
    return client


def count(server, folder: str, subject: str | None = None) -> int:
    """Messages in ``folder`` on ``server`` (with ``subject``), asked directly."""
    direct = server.imap(REF_USER)
    try:
        typ, data = direct.select(f'"{folder}"')
        assert typ == "OK", data
        if subject is None:
            return int(data[0])
        typ, data = direct.search(None, "SUBJECT", f'"{subject}"')
        return len(data[0].split())
    finally:
        direct.logout()


def put(client: imaplib.IMAP4, folder: str, subject: str) -> None:
    typ, data = client.append(folder, None, None,
                              f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert typ == "OK", data


def uid_command(client: imaplib.IMAP4, *args: str):
    """A UID command's tagged answer (imaplib's ``uid()`` returns only untagged data)."""
    return client._simple_command("UID", *args)


def uid_of(client: imaplib.IMAP4, subject: str) -> str:
    typ, data = client.uid("SEARCH", None, "SUBJECT", f'"{subject}"')
    assert typ == "OK" and len(data[0].split()) == 1, data
    return data[0].decode()


# -- COPY / MOVE ---------------------------------------------------------------------------


def test_copy_from_a_remote_folder_reaches_the_home_inbox(gateway, ref_home, ref_remote):
    marker = f"remote-to-home-{time.time_ns()}"
    client = login(gateway)
    try:
        put(client, "public/news", marker)
        remote_inbox = count(ref_remote, "INBOX")
        client.select("public/news")
        typ, data = uid_command(client, "COPY", uid_of(client, marker), "INBOX")
        assert typ == "OK", data
        copyuid = re.search(rb"\[COPYUID (\d+) (\d+) (\d+)\]", data[0])
        assert copyuid, data                    # home said APPENDUID: the gateway can tell
    finally:
        client.logout()
    assert count(ref_home, "INBOX", marker) == 1
    assert count(ref_remote, "INBOX") == remote_inbox      # not the remote server's own INBOX
    direct = ref_home.imap(REF_USER)
    try:
        typ, data = direct.select("INBOX")
        assert data and direct.untagged_responses["UIDVALIDITY"][0] == copyuid.group(1)
        typ, data = direct.uid("FETCH", copyuid.group(3).decode(),
                               "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert marker.encode() in data[0][1]    # the COPYUID is true
    finally:
        direct.logout()


def test_move_from_a_remote_folder_to_home(gateway, ref_home, ref_remote):
    marker = f"move-home-{time.time_ns()}"
    client = login(gateway)
    try:
        put(client, "public/announcements", marker)
        typ, data = client.select("public/announcements")
        before = int(data[0])
        typ, data = uid_command(client, "MOVE", uid_of(client, marker), "INBOX")
        assert typ == "OK", data
        typ, data = client.select("public/announcements")
        assert int(data[0]) == before - 1
    finally:
        client.logout()
    assert count(ref_home, "INBOX", marker) == 1
    assert count(ref_remote, "public/announcements", marker) == 0


def test_copy_between_folders_of_one_remote_server_keeps_its_copyuid(gateway, ref_remote):
    marker = f"remote-to-remote-{time.time_ns()}"
    client = login(gateway)
    try:
        put(client, "public/news", marker)
        client.select("public/news")
        typ, data = uid_command(client, "COPY", uid_of(client, marker), "public/announcements")
        assert typ == "OK", data
        assert b"[COPYUID " in data[0]          # the remote Dovecot's own, and true
    finally:
        client.logout()
    assert count(ref_remote, "public/announcements", marker) == 1


def test_copy_and_move_to_another_remote_server(gateway, ref_remote, ref_archive):
    marker = f"to-archive-{time.time_ns()}"
    client = login(gateway)
    try:
        put(client, "public/news", marker)
        client.select("public/news")
        uid = uid_of(client, marker)
        typ, data = uid_command(client, "COPY", uid, ARCHIVE_FOLDER)
        assert typ == "OK", data
        copyuid = re.search(rb"\[COPYUID (\d+) (\d+) (\d+)\]", data[0])
        typ, data = uid_command(client, "MOVE", uid, ARCHIVE_FOLDER)
        assert typ == "OK", data
    finally:
        client.logout()
    assert count(ref_archive, "old", marker) == 2
    if copyuid:   # only from the archive's own APPENDUID answers: check it is true
        direct = ref_archive.imap(REF_USER)
        try:
            direct.select("old")
            assert direct.untagged_responses["UIDVALIDITY"][0] == copyuid.group(1)
            typ, data = direct.uid("FETCH", copyuid.group(3).decode(),
                                   "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert marker.encode() in data[0][1]
        finally:
            direct.logout()
    assert count(ref_remote, "public/news", marker) == 0


def test_copy_to_a_folder_that_does_not_exist_is_refused(gateway):
    client = login(gateway)
    try:
        client.select("public/news")
        typ, data = client.copy("1", "no-such-folder")
        assert typ == "NO" and data[0].startswith(b"[TRYCREATE]"), data
    finally:
        client.logout()


# -- capabilities of the server a mailbox is on --------------------------------------------


def capabilities(client: imaplib.IMAP4) -> set[str]:
    typ, data = client.capability()
    assert typ == "OK"
    return set(data[0].decode().upper().split())


def test_capabilities_follow_the_selected_mailboxs_server(gateway):
    client = login(gateway)
    try:
        at_home = capabilities(client)
        assert {"MOVE", "UIDPLUS", "UNSELECT"} <= at_home
        assert "MAILBOX-REFERRALS" not in at_home
        typ, data = client.select(ARCHIVE_FOLDER)
        assert typ == "OK", data
        there = capabilities(client)
        assert not {"MOVE", "UIDPLUS", "UNSELECT"} & there
        assert {"IMAP4REV1", "IDLE"} <= there
        typ, data = uid_command(client, "EXPUNGE", "1")
        assert typ == "NO" and data[0].startswith(b"[CANNOT]"), data
        typ, data = client._simple_command("UNSELECT")
        assert typ == "NO" and data[0].startswith(b"[CANNOT]"), data
        client.select("INBOX")
        assert capabilities(client) == at_home
    finally:
        client.logout()


def test_status_keeps_the_clients_name_when_the_referral_renames(gateway):
    folders = (ARCHIVE_FOLDER, "public/news")     # "old" on its server; the same name
    client = login(gateway)
    try:
        answers = [client.status(folder, "(MESSAGES)") for folder in folders]
    finally:
        client.logout()
    for folder, (typ, data) in zip(folders, answers):
        assert typ == "OK" and data[0].startswith(f'"{folder}" (MESSAGES '.encode()), data


def test_enable_at_home_holds_on_a_remote_folder(gateway):
    # RFC 7162: SELECT's QRESYNC parameter is refused unless QRESYNC was ENABLEd; the
    # client ENABLEd it at home, so the gateway enables it on the referred link too.
    client = login(gateway)
    try:
        typ, data = client._simple_command("ENABLE", "QRESYNC")
        assert typ == "OK", data
        assert b"QRESYNC" in b" ".join(client.untagged_responses.pop("ENABLED", [b""]))
        typ, data = client._simple_command("SELECT", '"public/news"', "(QRESYNC (1 1))")
        assert typ == "OK", data
    finally:
        client.logout()


# -- mailbox commands on remote folders -----------------------------------------------------


def remote_names(ref_remote, command: str = "list") -> set[str]:
    direct = ref_remote.imap(REF_USER)
    try:
        typ, data = getattr(direct, command)('""', '"*"')
        return {line.decode().rsplit(' "/" ', 1)[-1].strip('"') for line in data if line}
    finally:
        direct.logout()


def test_examine_a_remote_folder_is_read_only(gateway):
    client = login(gateway)
    try:
        typ, data = client.select("public/news", readonly=True)
        assert typ == "OK", data
        assert "READ-ONLY" in client.untagged_responses
        typ, data = client.search(None, "SUBJECT", '"public news"')
        assert typ == "OK" and len(data[0].split()) == 1, data
    finally:
        client.logout()


def test_create_rename_subscribe_delete_a_remote_folder(gateway, ref_remote):
    first, second = f"public/tmp{time.time_ns()}", f"public/tmp{time.time_ns()}b"
    client = login(gateway)
    try:
        typ, data = client.create(first)
        assert typ == "OK", data
        assert first in remote_names(ref_remote)
        typ, data = client.rename(first, second)
        assert typ == "OK", data
        assert second in remote_names(ref_remote) and first not in remote_names(ref_remote)
        typ, data = client.subscribe(second)
        assert typ == "OK", data
        assert second in remote_names(ref_remote, "lsub")
        typ, data = client.lsub('""', '"public/*"')
        assert typ == "OK" and any(b"public/news" in line for line in data), data
        typ, data = client.unsubscribe(second)
        assert typ == "OK", data
        assert second not in remote_names(ref_remote, "lsub")
        typ, data = client.delete(second)
        assert typ == "OK", data
        assert second not in remote_names(ref_remote)
    finally:
        client.logout()


# -- the home connection while the client is elsewhere --------------------------------------


def test_home_connection_outlives_its_autologout_while_a_remote_folder_is_selected(
        tmp_path_factory, redis_server, make_referral_backend, ref_remote, ref_archive):
    # The scripted home logs a connection out after 4 s of silence (Dovecot's autologout is
    # a fixed 30 minutes); the gateway NOOPs every link unused for 1 s.
    home = make_referral_backend(idle_timeout=4.0)
    gateway = routed_gateway(tmp_path_factory, redis_server, home, ref_remote, ref_archive,
                             {"referrals": {"home_keepalive": 1.0}})
    try:
        client = login(gateway)
        typ, data = client.select("public/news")
        assert typ == "OK", data
        time.sleep(6)      # the scenario itself: longer than the home server's autologout
        assert any(re.match(rb"MGR\d+ NOOP", line) for line in home.commands)
        typ, data = client.select("INBOX")
        assert typ == "OK", data
        typ, data = client.list('""', '"*"')
        assert typ == "OK" and any(b"public/news" in line for line in data)
        client.logout()
    finally:
        gateway.stop()

