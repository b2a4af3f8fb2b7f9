"""The IMAP proxy end to end: real clients → gateway subprocess → real Dovecot back-ends."""
from __future__ import annotations

import hashlib
import imaplib
import os
import socket
import subprocess
import time

import pytest
from imapclient import IMAPClient

import servers
from clients import ImapRaw, data_segments_in, unique_message, wait_for_exists
from conftest import USERS_A, USERS_B

AUTH_FAILED = b"[AUTHENTICATIONFAILED] Authentication failed."


Raw = ImapRaw



def login_gateway(gateway, user: str, password: str | None = None) -> imaplib.IMAP4:
    password = USERS_A.get(user) or USERS_B.get(user) if password is None else password
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    client.login(user, password)
    return client


def search_subject(client: imaplib.IMAP4, marker: str) -> list[bytes]:
    client.select("INBOX")
    typ, data = client.search(None, "SUBJECT", f'"{marker}"')
    assert typ == "OK"
    return data[0].split()


# -- greeting and pre-auth --------------------------------------------------------------------

def test_greeting_and_preauth_capabilities(gateway):
    raw = Raw(gateway.imap_port)
    assert raw.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    for backend_hint in (b"127.0.0.1", b"Dovecot", b"dovecot"):
        assert backend_hint not in raw.greeting
    raw.send(b"a CAPABILITY\r\nb NOOP\r\nc SELECT INBOX\r\nd LOGOUT\r\n")
    lines = raw.until_tagged(b"d")
    caps = lines[0].split()
    assert set(caps[2:]) == {b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"AUTH=PLAIN",
                             b"AUTH=LOGIN"}
    assert lines[1].startswith(b"a OK")
    assert lines[2].startswith(b"b OK")
    assert lines[3].startswith(b"c BAD")
    assert lines[4].startswith(b"* BYE")
    assert lines[5].startswith(b"d OK")
    assert raw.closed()


def test_garbage_before_login_gets_bad_not_traceback(gateway):
    raw = Raw(gateway.imap_port)
    raw.send(b'a LOGIN "unterminated\r\n(((\r\n\xff\xfe\r\nb NOOP\r\n')
    lines = raw.until_tagged(b"b")
    assert lines[0].startswith(b"a BAD")
    assert all(b"Traceback" not in line for line in lines)
    assert lines[-1].startswith(b"b OK")


def test_id_is_answered_before_login(gateway):
    raw = Raw(gateway.imap_port)
    raw.send(b'a ID ("name" "pytest" "version" "1")\r\n')
    lines = raw.until_tagged(b"a")
    assert lines[0].startswith(b"* ID ")
    assert lines[-1].startswith(b"a OK")


def test_too_many_invalid_commands_end_the_connection(gateway):
    """The tenth BAD comes with a BYE in the same answer, then the gateway closes (as
    Dovecot does)."""
    raw = Raw(gateway.imap_port)
    try:
        raw.send(b"".join(b"t%d FROB\r\n" % n for n in range(12)))
        lines = raw.until_tagged(b"t9")
        assert [line.split()[1] for line in lines] == [b"BAD"] * 10
        assert raw.line() == b"* BYE Too many invalid IMAP commands."
        assert raw.closed()
    finally:
        raw.close()


@pytest.mark.parametrize("command,untagged", [(b"a CAPABILITY", b"* CAPABILITY "),
                                              (b'a ID ("name" "pytest")', b"* ID "),
                                              (b"a LOGOUT", b"* BYE ")])
def test_an_answer_with_untagged_data_is_one_write(gateway, command, untagged):
    """The untagged line and the tagged one leave in one send: the client gets one segment
    (the listener has TCP_NODELAY, so two sends were two segments and two wake-ups)."""
    raw = Raw(gateway.imap_port)
    try:
        before = data_segments_in(raw.sock)
        raw.send(command + b"\r\n")
        lines = raw.until_tagged(b"a")
        assert lines[0].startswith(untagged) and lines[-1].startswith(b"a OK")
        assert data_segments_in(raw.sock) - before == 1
    finally:
        raw.close()


# -- routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("user,home", [("alice@example.com", "a"), ("bob@example.com", "b")])
def test_users_land_on_their_own_backend(gateway, dovecot_a, dovecot_b, user, home):
    marker = f"route-{user}-{time.time_ns()}"
    server = {"a": dovecot_a, "b": dovecot_b}[home]
    server.deliver(user, unique_message(marker))
    client = login_gateway(gateway, user)
    try:
        assert len(search_subject(client, marker)) == 1
    finally:
        client.logout()


def test_login_capabilities_are_filtered(gateway):
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN alice@example.com alice-secret\r\n")
    tagged = raw.until_tagged(b"a")[-1]
    assert tagged.startswith(b"a OK [CAPABILITY IMAP4rev1")
    for dropped in (b"LOGIN-REFERRALS", b"COMPRESS=", b"STARTTLS", b"AUTH=", b"SASL-IR "):
        assert dropped not in tagged
    assert b"IDLE" in tagged


# -- failures ---------------------------------------------------------------------------------

def test_wrong_password_and_unknown_user_are_identical(gateway):
    answers = []
    for user, password in (("alice@example.com", "wrong"), ("nobody@example.com", "wrong"),
                           ("bob@example.com", "")):
        client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
        with pytest.raises(imaplib.IMAP4.error) as failure:
            client.login(user, password or "x")
        answers.append(failure.value.args[0])
        client.shutdown()
    assert answers[0] == answers[1] == answers[2]
    assert AUTH_FAILED in answers[0]


def test_failed_login_may_be_retried_on_the_same_connection(gateway):
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN alice@example.com wrong\r\n")
    assert raw.until_tagged(b"a")[-1] == b"a NO " + AUTH_FAILED
    raw.send(b"b LOGIN alice@example.com alice-secret\r\nc SELECT INBOX\r\n")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")
    assert raw.until_tagged(b"c")[-1].startswith(b"c OK")


def test_backend_down_is_unavailable_and_retryable(make_gateway):
    dead_port = servers.free_port()
    gateway = make_gateway(
        backends={"DOWN": ("127.0.0.1", dead_port, dead_port)},
        routes={"alice@example.com": "DOWN"})
    raw = Raw(gateway.imap_port)
    for tag in (b"a", b"b"):
        raw.send(tag + b" LOGIN alice@example.com alice-secret\r\n")
        answer = raw.until_tagged(tag)[-1]
        assert answer.startswith(tag + b" NO [UNAVAILABLE]")
    raw.send(b"c NOOP\r\n")
    assert raw.until_tagged(b"c")[-1].startswith(b"c OK")


def test_slow_backend_is_unavailable_within_the_connect_timeout(make_gateway):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        gateway = make_gateway(
            backends={"SLOW": {"address": "127.0.0.1", "imap_port": port, "pop3_port": port,
                               "connect_timeout": 1}},
            routes={"alice@example.com": "SLOW"})
        raw = Raw(gateway.imap_port)
        started = time.monotonic()
        raw.send(b"a LOGIN alice@example.com alice-secret\r\n")
        assert raw.until_tagged(b"a")[-1].startswith(b"a NO [UNAVAILABLE]")
        assert time.monotonic() - started < 10   # bounded, not hung
    finally:
        silent.close()


def test_redis_down_is_unavailable(make_gateway):
    gateway = make_gateway(redis_url=f"redis://127.0.0.1:{servers.free_port()}/0")
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN alice@example.com alice-secret\r\n")
    assert raw.until_tagged(b"a")[-1].startswith(b"a NO [UNAVAILABLE]")


# -- login forms ------------------------------------------------------------------------------

def test_login_with_literal_plus_and_sync_literals(gateway):
    raw = Raw(gateway.imap_port)
    user, password = b"carol@example.com", b"carol-secret"
    raw.send(b"a LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(password), password))
    assert raw.until_tagged(b"a")[-1].startswith(b"a OK")
    raw = Raw(gateway.imap_port)
    raw.send(b"b LOGIN {%d}\r\n" % len(user))
    assert raw.line().startswith(b"+ ")
    raw.send(user + b" {%d}\r\n" % len(password))
    assert raw.line().startswith(b"+ ")
    raw.send(password + b"\r\n")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")


def test_weird_password_with_quotes_backslashes_braces_and_utf8(gateway):
    password = USERS_A["weird@example.com"].encode()
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN weird@example.com {%d+}\r\n%s\r\n" % (len(password), password))
    assert raw.until_tagged(b"a")[-1].startswith(b"a OK")
    ascii_part = b'"p a\\"s\\\\s{5}w"'   # quoted form of a different (wrong) password
    raw = Raw(gateway.imap_port)
    raw.send(b"b LOGIN weird@example.com " + ascii_part + b"\r\n")
    assert raw.until_tagged(b"b")[-1] == b"b NO " + AUTH_FAILED


def test_authenticate_plain_with_and_without_sasl_ir_and_cancel(gateway):
    import base64
    token = base64.b64encode(b"\0bob@example.com\0bob-secret")
    raw = Raw(gateway.imap_port)
    raw.send(b"a AUTHENTICATE PLAIN " + token + b"\r\n")
    assert raw.until_tagged(b"a")[-1].startswith(b"a OK")

    raw = Raw(gateway.imap_port)
    raw.send(b"b AUTHENTICATE PLAIN\r\n")
    assert raw.line().startswith(b"+")
    raw.send(b"*\r\n")
    assert raw.until_tagged(b"b")[-1].startswith(b"b BAD")
    raw.send(b"c AUTHENTICATE PLAIN\r\n")
    assert raw.line().startswith(b"+")
    raw.send(token + b"\r\n")
    assert raw.until_tagged(b"c")[-1].startswith(b"c OK")

    client = IMAPClient("127.0.0.1", port=gateway.imap_port, ssl=False, timeout=10)
    client.plain_login("dave@example.com", "dave-secret")
    assert client.select_folder("INBOX")
    client.logout()


@pytest.mark.parametrize("field", ["user", "password"])
def test_injection_in_login_arguments_never_becomes_a_command(gateway, dovecot_a, field):
    mailbox = f"pwned{field}{os.getpid()}"
    evil = f"x\r\nX1 CREATE {mailbox}\r\nX2 NOOP".encode()
    user, password = b"alice@example.com", b"alice-secret"
    if field == "user":
        user = evil
    else:
        password = evil
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(password), password))
    assert raw.until_tagged(b"a")[-1] == b"a NO " + AUTH_FAILED
    raw.send(b"b NOOP\r\n")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")
    direct = dovecot_a.imap("alice@example.com")
    try:
        typ, listing = direct.list()
        assert typ == "OK"
        assert not any(mailbox.encode() in entry for entry in listing)
    finally:
        direct.logout()


def test_very_long_login_values_are_refused_cleanly(gateway):
    raw = Raw(gateway.imap_port)
    user = b"u" * 4000 + b"@example.com"
    raw.send(b"a LOGIN {%d+}\r\n%s hunter2\r\n" % (len(user), user))
    assert raw.until_tagged(b"a")[-1] == b"a NO " + AUTH_FAILED
    huge = 10 * 1024 * 1024
    raw.send(b"b LOGIN {%d}\r\n" % huge)   # above the pre-login literal bound
    line = raw.line()
    assert line.startswith(b"* BYE") or line.startswith(b"b NO") or line.startswith(b"b BAD")


# -- after login --------------------------------------------------------------------------------

def test_20mb_append_and_fetch_are_byte_identical(gateway):
    marker = f"big-{time.time_ns()}"
    message = unique_message(marker, 20 * 1024 * 1024)
    digest = hashlib.sha256(message).hexdigest()
    client = login_gateway(gateway, "carol@example.com")
    try:
        typ, _ = client.append("INBOX", None, None, message)
        assert typ == "OK"
        uids = search_subject(client, marker)
        assert len(uids) == 1
        typ, data = client.fetch(uids[0], "(BODY.PEEK[])")
        assert typ == "OK"
        assert hashlib.sha256(data[0][1]).hexdigest() == digest
    finally:
        client.logout()


def test_idle_sees_a_message_delivered_to_the_backend(gateway, dovecot_b):
    client = IMAPClient("127.0.0.1", port=gateway.imap_port, ssl=False, timeout=10)
    client.login("dave@example.com", "dave-secret")
    client.select_folder("INBOX")
    client.idle()
    try:
        dovecot_b.deliver("dave@example.com", unique_message(f"idle-{time.time_ns()}"))
        assert wait_for_exists(client)
    finally:
        client.idle_done()
        client.logout()


def test_pipelined_commands_including_right_after_login(gateway):
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN bob@example.com bob-secret\r\nb SELECT INBOX\r\nc NOOP\r\n"
             b"d STATUS INBOX (MESSAGES)\r\ne LOGOUT\r\n")
    lines = raw.until_tagged(b"e")   # the back-end may answer pipelined commands in any order
    tagged = {line.split(b" ", 1)[0]: line for line in lines if not line.startswith(b"*")}
    assert set(tagged) == {b"a", b"b", b"c", b"d", b"e"}
    assert all(b" OK " in line for line in tagged.values())
    assert raw.closed()


def test_backend_closing_mid_session_gives_bye(gateway, dovecot_a):
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN carol@example.com carol-secret\r\nb SELECT INBOX\r\n")
    raw.until_tagged(b"b")
    subprocess.run(["doveadm", "-c", str(dovecot_a.config_path), "kick", "carol@example.com"],
                   check=True, capture_output=True, timeout=20)
    deadline = time.monotonic() + 10
    lines = []
    while time.monotonic() < deadline:
        try:
            lines.append(raw.line())
        except EOFError:
            break
    assert any(line.startswith(b"* BYE") for line in lines)


def test_session_log_line_and_no_password_in_logs(gateway):
    client = login_gateway(gateway, "alice@example.com")
    client.logout()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "login=alice@example.com backend=A" not in gateway.log_text():
        time.sleep(0.1)
    text = gateway.log_text()
    assert "login=alice@example.com backend=A" in text
    assert "proto=imap client=127.0.0.1" in text
    for password in list(USERS_A.values()) + list(USERS_B.values()):
        assert password not in text


# -- time and size bounds -------------------------------------------------------------------

def test_idle_timeouts_before_and_after_login(make_gateway):
    gateway = make_gateway(routes={"alice@example.com": "A"},
                           sections={"imap": {"preauth_timeout": 1, "idle_timeout": 1}})
    raw = Raw(gateway.imap_port)
    assert raw.line().startswith(b"* BYE")      # nothing sent: autologout before login
    assert raw.closed()
    raw = Raw(gateway.imap_port)
    raw.send(b"a LOGIN alice@example.com alice-secret\r\n")
    assert raw.until_tagged(b"a")[-1].startswith(b"a OK")
    assert raw.line().startswith(b"* BYE")      # idle after login
    assert raw.closed()


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as fh:
            total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return total


def test_big_fetches_to_a_slow_and_a_fast_reader_on_one_worker_stay_apart(make_gateway):
    """Bulk answers go socket → pipe → socket (splice) through one pipe per worker: a reader
    that cannot keep up must get its own bytes, complete, and never the other session's."""
    gateway = make_gateway(workers=1, routes={"carol@example.com": "A", "dave@example.com": "B"})
    messages = {}
    for user in ("carol@example.com", "dave@example.com"):
        marker = f"splice-{user[:4]}-{time.time_ns()}"
        messages[user] = unique_message(marker, 6 * 1024 * 1024)
        client = login_gateway(gateway, user)
        try:
            assert client.append("INBOX", None, None, messages[user])[0] == "OK"
            uid = search_subject(client, marker)[0]
        finally:
            client.logout()
        messages[user] = (uid, hashlib.sha256(messages[user]).hexdigest(), len(messages[user]))
    slow = Raw(gateway.imap_port)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    fast = login_gateway(gateway, "dave@example.com")
    try:
        slow.send(b'a1 LOGIN "carol@example.com" "%s"\r\n'
                  % USERS_A["carol@example.com"].encode())
        assert slow.until_tagged(b"a1")[-1].startswith(b"a1 OK")
        slow.send(b"s1 SELECT INBOX\r\ns2 FETCH " + messages["carol@example.com"][0]
                  + b" (BODY.PEEK[])\r\n")
        time.sleep(0.5)          # the gateway meets a full client socket while it relays
        fast.select("INBOX")
        typ, data = fast.fetch(messages["dave@example.com"][0], "(BODY.PEEK[])")
        assert typ == "OK"
        assert hashlib.sha256(data[0][1]).hexdigest() == messages["dave@example.com"][1]
        answer = bytearray(slow.buffer)
        while not answer.endswith(b"\r\n") or b"\r\ns2 OK" not in answer[-200:]:
            piece = slow.sock.recv(8192)
            assert piece, "the gateway closed the slow reader's session"
            answer += piece
            time.sleep(0.0005)
        start = answer.index(b"}\r\n", answer.index(b"BODY[]")) + 3
        body = bytes(answer[start:start + messages["carol@example.com"][2]])
        assert hashlib.sha256(body).hexdigest() == messages["carol@example.com"][1]
    finally:
        slow.close()
        fast.logout()


def test_50mb_literal_streams_without_growing_worker_memory(make_gateway):
    gateway = make_gateway(workers=1, routes={"carol@example.com": "A"})
    workers = gateway.worker_pids()
    client = login_gateway(gateway, "carol@example.com")
    try:
        client.select("INBOX")
        before = rss_kib(workers)
        marker = f"huge-{time.time_ns()}"
        message = unique_message(marker, 50 * 1024 * 1024)
        assert client.append("INBOX", None, None, message)[0] == "OK"
        uids = search_subject(client, marker)
        typ, data = client.fetch(uids[0], "(BODY.PEEK[])")
        assert len(data[0][1]) == len(message)
        del message, data
        client.store(uids[0], "+FLAGS", "(\\Deleted)")
        client.expunge()
        grown = rss_kib(workers) - before
    finally:
        client.logout()
    assert grown < 16 * 1024, f"worker RSS grew by {grown} KiB while relaying 2 x 50 MB"
