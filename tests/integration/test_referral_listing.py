"""Every LIST form a client may send shows the merged folder list (home + remote) in
mailbox-referral mode, with correct attributes and STATUS answers (RFC 5258, RFC 5819).

The scripted home (tests/referral_backend.py) offers LIST-EXTENDED and LIST-STATUS as a
Dovecot home would, but lists remote folders only for RLIST / RLSUB: relayed as they are,
these forms would show INBOX only (what mutt and neomutt met).
"""
from __future__ import annotations

import re

import pytest
from imapclient import IMAPClient

from clients import ImapRaw
from referral_fixtures import *  # noqa: F401,F403 - fixtures
from referral_fixtures import ARCHIVE_FOLDER, REF_PASSWORD, REF_USER

_LIST = re.compile(rb'\* LIST \(([^)]*)\) (?:"/"|NIL) "?([^"]*)"?(.*)')
_STATUS = re.compile(rb'\* STATUS "?([^"]*)"? \(MESSAGES (\d+)\)')


@pytest.fixture
def gateway(archive_gateway):
    return archive_gateway


@pytest.fixture
def raw(gateway):
    client = ImapRaw(gateway.imap_port)
    client.send(f'a LOGIN "{REF_USER}" "{REF_PASSWORD}"\r\n'.encode())
    assert client.until_tagged(b"a")[-1].startswith(b"a OK")
    yield client
    client.close()


def listing(raw: ImapRaw, command: str) -> tuple[dict[str, tuple[set[str], bytes]], dict]:
    """{folder: (attributes, extended data)} and {folder: MESSAGES} of one LIST command."""
    raw.send(b"t " + command.encode() + b"\r\n")
    lines = raw.until_tagged(b"t")
    assert lines[-1].startswith(b"t OK"), lines
    folders, status = {}, {}
    for line in lines[:-1]:
        if (found := _LIST.match(line)):
            folders[found.group(2).decode()] = (set(found.group(1).decode().split()),
                                                found.group(3))
        elif (found := _STATUS.match(line)):
            status[found.group(1).decode()] = int(found.group(2))
    return folders, status


def direct_count(server, folder: str) -> int:
    direct = server.imap(REF_USER)
    try:
        typ, data = direct.select(f'"{folder}"', readonly=True)
        return int(data[0])
    finally:
        direct.logout()


def test_list_extended_is_advertised_and_merged(raw):
    raw.send(b"c CAPABILITY\r\n")
    capability = raw.until_tagged(b"c")[0].upper()
    assert b" LIST-EXTENDED" in capability and b" LIST-STATUS" in capability
    assert b"MAILBOX-REFERRALS" not in capability


def test_list_percent_return_children(raw):
    folders, _ = listing(raw, 'LIST "" "%" RETURN (CHILDREN)')
    assert {"INBOX", "public", "archive"} <= set(folders)
    assert "\\HasChildren" in folders["public"][0]
    assert "\\HasChildren" in folders["archive"][0]
    assert "\\HasNoChildren" in folders["INBOX"][0]


def test_list_subscribed_recursivematch(raw):
    raw.send(b's SUBSCRIBE "INBOX"\r\n')
    assert raw.until_tagged(b"s")[-1].startswith(b"s OK")
    folders, _ = listing(raw, 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)')
    assert "\\Subscribed" in folders["INBOX"][0]
    # "public" itself is not subscribed, its children are (RFC 5258 §3.5 CHILDINFO).
    assert "\\Subscribed" not in folders["public"][0]
    assert b'("CHILDINFO" ("SUBSCRIBED"))' in folders["public"][1]


def test_list_return_status_answers_for_remote_folders(raw, ref_home, ref_remote, ref_archive):
    folders, status = listing(raw, 'LIST "" "*" RETURN (STATUS (MESSAGES))')
    assert {"INBOX", "public/news", "public/announcements", ARCHIVE_FOLDER} <= set(folders)
    assert "public" not in status                     # \Noselect: no STATUS
    assert status["INBOX"] == direct_count(ref_home, "INBOX")
    assert status["public/news"] == direct_count(ref_remote, "public/news")
    assert status[ARCHIVE_FOLDER] == direct_count(ref_archive, "old")   # the client's name


def test_list_with_several_patterns(raw):
    folders, _ = listing(raw, 'LIST "" ("INBOX" "public/*")')
    assert set(folders) == {"INBOX", "public/news", "public/announcements"}


def test_list_special_use_selection_and_bad_options(raw):
    folders, _ = listing(raw, 'LIST (SPECIAL-USE) "" "*"')
    assert all(attributes & {"\\Sent", "\\Trash", "\\Drafts", "\\Junk", "\\Archive",
                             "\\All", "\\Flagged"} for attributes, _ in folders.values())
    raw.send(b'b LIST (RECURSIVEMATCH) "" "%"\r\n')
    assert raw.until_tagged(b"b")[-1].startswith(b"b BAD")
    raw.send(b'b LIST (NO-SUCH-OPTION) "" "%"\r\n')
    assert raw.until_tagged(b"b")[-1].startswith(b"b BAD")


def test_imapclient_folder_listings_show_remote_folders(gateway):
    client = IMAPClient("127.0.0.1", port=gateway.imap_port, ssl=False, timeout=15)
    try:
        client.login(REF_USER, REF_PASSWORD)
        assert client.has_capability("LIST-EXTENDED")
        names = {name for _, _, name in client.list_folders()}
        assert {"INBOX", "public/news", ARCHIVE_FOLDER} <= names
        # imapclient's LIST-EXTENDED form: LIST (SUBSCRIBED) "" "*" ... via list_sub_folders
        # uses LSUB; send the extended form through its raw command interface too.
        typ, data = client._imap._simple_command(
            "LIST", '(SUBSCRIBED)', '""', '"public/*"', "RETURN", "(CHILDREN)")
        assert typ == "OK"
        listed = client._imap.untagged_responses.pop("LIST", [])
        assert any(b"public/news" in line for line in listed)
    finally:
        client.logout()
