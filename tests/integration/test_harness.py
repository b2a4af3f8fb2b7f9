"""The test servers themselves: Dovecot and Redis answer real clients and stop cleanly."""
from __future__ import annotations

import imaplib
import os
import poplib
import uuid

import pytest

import servers

pytestmark = pytest.mark.integration


def _message(subject: str) -> bytes:
    return (f"From: sender@example.net\r\nTo: someone@example.com\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{uuid.uuid4()}@test>\r\n\r\n"
            f"body of {subject}\r\n").encode()


def _alive(pid: int) -> bool:
    stat = servers._proc_stat(pid)
    return stat is not None and stat[0] != "Z"


@pytest.mark.parametrize("backend, user", [
    ("dovecot_a", "alice@example.com"),
    ("dovecot_a", "weird@example.com"),
    ("dovecot_b", "bob@example.com"),
])
def test_imap_login_select_and_fetch_delivered_message(request, backend, user):
    dovecot = request.getfixturevalue(backend)
    client = dovecot.imap(user)
    try:
        typ, data = client.select("INBOX")
        assert typ == "OK"
        before = int(data[0])
        subject = f"harness {uuid.uuid4()}"
        dovecot.deliver(user, _message(subject))
        typ, data = client.select("INBOX")
        assert typ == "OK" and int(data[0]) == before + 1
        typ, data = client.fetch(str(before + 1), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        assert subject.encode() in data[0][1]
    finally:
        client.logout()


@pytest.mark.parametrize("backend, user", [
    ("dovecot_a", "carol@example.com"),
    ("dovecot_a", "weird@example.com"),
    ("dovecot_b", "dave@example.com"),
])
def test_pop3_login_and_retr_delivered_message(request, backend, user):
    dovecot = request.getfixturevalue(backend)
    subject = f"pop3 harness {uuid.uuid4()}"
    dovecot.deliver(user, _message(subject))
    client = dovecot.pop3(user)
    try:
        count, _size = client.stat()
        assert count >= 1
        found = any(f"Subject: {subject}".encode() in client.retr(n)[1]
                    for n in range(1, count + 1))
        assert found
        assert client.uidl()[0].startswith(b"+OK")
    finally:
        client.quit()


def test_deliver_into_another_folder(dovecot_a):
    dovecot_a.deliver("alice@example.com", _message("archived"), folder="Archive")
    client = dovecot_a.imap("alice@example.com")
    try:
        typ, data = client.select("Archive", readonly=True)
        assert typ == "OK" and int(data[0]) >= 1
    finally:
        client.logout()
    assert (dovecot_a.maildir("alice@example.com") / ".Archive" / "cur").is_dir()


@pytest.mark.parametrize("backend, user", [
    ("dovecot_a", "alice@example.com"),
    ("dovecot_b", "bob@example.com"),
    ("dovecot_a", "nobody-here@example.com"),
])
def test_wrong_password_is_refused(request, backend, user):
    dovecot = request.getfixturevalue(backend)
    with pytest.raises(imaplib.IMAP4.error):
        dovecot.imap(user, password="wrong-secret")
    with pytest.raises(poplib.error_proto):
        dovecot.pop3(user, password="wrong-secret")


def test_user_is_not_on_the_other_backend(dovecot_b):
    with pytest.raises(imaplib.IMAP4.error):
        dovecot_b.imap("alice@example.com", password="alice-secret")


def test_dovecot_logs_to_a_file(dovecot_a):
    dovecot_a.imap("carol@example.com").logout()
    assert "user=<carol@example.com>" in dovecot_a.log_text()


def test_redis_answers_ping(redis_server):
    with redis_server.client() as client:
        assert client.ping() is True
    url = redis_server.allocate_db()
    assert url.startswith(f"redis://127.0.0.1:{redis_server.port}/")
    assert url != redis_server.url


def test_teardown_leaves_no_dovecot_behind(tmp_path, dovecot_a):  # dovecot_a: skip if missing
    dovecot = servers.Dovecot(tmp_path, "T", {"tess@example.com": "tess-secret"})
    dovecot.start()
    client = dovecot.imap("tess@example.com")   # a mail process is in the group too
    client.select("INBOX")
    master = dovecot.pid
    group = servers._pids_in_group(master)
    assert master in group and len(group) > 2
    root = dovecot.root
    dovecot.stop()
    client.shutdown()
    assert dovecot.leftover_pids == []
    assert servers._pids_in_group(master) == []
    assert not any(_alive(pid) for pid in group)
    assert not root.exists()
    assert "tess@example.com" in dovecot.log_text()   # logs survive in tmp_path


def test_teardown_leaves_no_redis_behind(tmp_path, redis_server):  # skip if not installed
    private = servers.RedisServer(tmp_path)
    private.start()
    pid = private.pid
    assert _alive(pid)
    assert private.stop() == 0
    assert not _alive(pid)
    assert servers._pids_in_group(pid) == []
    assert not any(name.endswith((".rdb", ".aof")) for name in os.listdir(tmp_path))


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path, dovecot_a):
    """The fallback: a server that will not stop on TERM is killed with its whole group."""
    dovecot = servers.Dovecot(tmp_path, "K", {"kim@example.com": "kim-secret"})
    dovecot.start()
    master = dovecot.pid
    dovecot.stop(sig=0, timeout=0.2)   # signal 0 delivers nothing: only the KILL can end it
    assert servers._pids_in_group(master) == []
    assert dovecot.process.returncode == -9
