"""The POP3 proxy end to end: poplib and raw sockets → gateway subprocess → real Dovecot."""
from __future__ import annotations

import base64
import hashlib
import poplib
import subprocess
import time

import pytest

import servers
from clients import Pop3Raw, unique_message
from conftest import USERS_A, USERS_B

AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
PASSWORDS = {**USERS_A, **USERS_B}


Raw = Pop3Raw



def plain(authcid: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


def pop_gateway(gateway, user: str, password: str | None = None) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", gateway.pop3_port, timeout=10)
    client.user(user)
    client.pass_(PASSWORDS[user] if password is None else password)
    return client


def find_marker(client: poplib.POP3, marker: str) -> list[int]:
    """Message numbers whose headers carry ``marker`` (TOP n 0: headers only)."""
    count = client.stat()[0]
    return [n for n in range(1, count + 1)
            if any(marker.encode() in line for line in client.top(n, 0)[1])]


def wait_for_log(server, ready, timeout: float = 5.0) -> str:
    """The server's log once ``ready(text)`` holds (logs are written asynchronously)."""
    deadline = time.monotonic() + timeout
    while not ready(server.log_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.log_text()


# -- pre-auth at the gateway ----------------------------------------------------------------------

def test_greeting_capa_and_commands_before_login(gateway):
    raw = Raw(gateway.pop3_port)
    assert raw.greeting.startswith(b"+OK ")
    for hint in (b"<", b"Dovecot", b"127.0.0.1", b"XCLIENT"):
        assert hint not in raw.greeting   # no APOP timestamp, nothing of the back-end
    raw.send(b"CAPA\r\nSTAT\r\nNOOP\r\nRETR 1\r\nAPOP alice@example.com 0123\r\nQUIT\r\n")
    capa = raw.multiline()
    assert capa[0].startswith(b"+OK")
    assert {b"USER", b"SASL PLAIN LOGIN", b"RESP-CODES", b"PIPELINING", b"TOP", b"UIDL"} <= \
        set(capa[1:-1])
    assert b"STLS" not in capa   # a plain listener offers no TLS
    for _ in range(4):
        assert raw.line().startswith(b"-ERR")
    assert raw.line().startswith(b"+OK")
    assert raw.closed()


def test_auth_plain_with_and_without_initial_response_and_cancel(gateway):
    raw = Raw(gateway.pop3_port)
    raw.send(b"AUTH PLAIN " + plain("bob@example.com", "bob-secret") + b"\r\n")
    assert raw.line().startswith(b"+OK")

    raw = Raw(gateway.pop3_port)
    raw.send(b"AUTH\r\n")
    assert raw.multiline() == [b"+OK", b"PLAIN", b"LOGIN", b"."]
    raw.send(b"AUTH CRAM-MD5\r\n")
    assert raw.line().startswith(b"-ERR")
    raw.send(b"AUTH PLAIN\r\n")
    assert raw.line() == b"+ "
    raw.send(b"*\r\n")
    assert raw.line().startswith(b"-ERR")
    raw.send(b"AUTH PLAIN\r\n")
    assert raw.line() == b"+ "
    raw.send(plain("dave@example.com", "dave-secret") + b"\r\n")
    assert raw.line().startswith(b"+OK")
    raw.send(b"STAT\r\n")
    assert raw.line().startswith(b"+OK ")


def test_long_lines_are_refused_and_the_session_survives(gateway):
    raw = Raw(gateway.pop3_port)
    raw.send(b"USER " + b"a" * 300 + b"\r\n")       # above RFC 2449's 255 octets
    assert raw.line() == b"-ERR Line too long."
    raw.send(b"NOOP " + b"b" * 20000 + b"\r\n")     # above every buffer the gateway keeps
    assert raw.line() == b"-ERR Line too long."
    raw.send(b"USER alice@example.com\r\nPASS alice-secret\r\nSTAT\r\n")
    assert raw.line().startswith(b"+OK")
    assert raw.line().startswith(b"+OK")
    assert raw.line().startswith(b"+OK ")


# -- routing and transparency ---------------------------------------------------------------------

def _session_transcript(client: poplib.POP3, number: int) -> list:
    return [client.stat(), client.list(), client.uidl(), client.list(number),
            client.uidl(number), client.top(number, 2), client.retr(number)]


@pytest.mark.parametrize("user,home", [("alice@example.com", "a"), ("bob@example.com", "b")])
def test_routing_and_answers_identical_to_a_direct_session(gateway, dovecot_a, dovecot_b,
                                                           user, home):
    server = {"a": dovecot_a, "b": dovecot_b}[home]
    marker = f"pop3-route-{user}-{time.time_ns()}"
    server.deliver(user, unique_message(marker))
    proxied = pop_gateway(gateway, user)
    try:
        (number,) = find_marker(proxied, marker)   # found only on the user's own back-end
        through_gateway = _session_transcript(proxied, number)
    finally:
        proxied.quit()
    direct = server.pop3(user)
    try:
        assert _session_transcript(direct, number) == through_gateway
    finally:
        direct.quit()


def test_20mb_retr_is_byte_identical(gateway, dovecot_a):
    marker = f"pop3-big-{time.time_ns()}"
    message = unique_message(marker, 20 * 1024 * 1024)
    dovecot_a.deliver("carol@example.com", message)
    client = pop_gateway(gateway, "carol@example.com")
    try:
        (number,) = find_marker(client, marker)
        assert client.list(number).split()[2] == str(len(message)).encode()
        _, lines, _ = client.retr(number)
        assert hashlib.sha256(b"\r\n".join(lines) + b"\r\n").digest() == \
            hashlib.sha256(message).digest()
        client.dele(number)   # keep carol's mailbox small for the other tests
    finally:
        client.quit()


def test_dele_and_quit_delete_on_the_backend(gateway, dovecot_b):
    doomed, kept = f"pop3-doomed-{time.time_ns()}", f"pop3-kept-{time.time_ns()}"
    for marker in (doomed, kept):
        dovecot_b.deliver("dave@example.com", unique_message(marker))
    client = pop_gateway(gateway, "dave@example.com")
    before = client.stat()[0]
    (number,) = find_marker(client, doomed)
    assert client.dele(number).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    direct = dovecot_b.pop3("dave@example.com")
    try:
        assert direct.stat()[0] == before - 1
        assert find_marker(direct, doomed) == []
        assert len(find_marker(direct, kept)) == 1
    finally:
        direct.quit()


def test_pipelined_commands_including_right_after_pass(gateway):
    raw = Raw(gateway.pop3_port)
    raw.send(b"CAPA\r\nUSER bob@example.com\r\nPASS bob-secret\r\nSTAT\r\nLIST\r\nUIDL\r\n"
             b"NOOP\r\nQUIT\r\n")
    assert raw.multiline()[-1] == b"."
    assert raw.line().startswith(b"+OK")              # USER
    assert raw.line().startswith(b"+OK")              # PASS: the back-end's answer
    count = int(raw.line().split()[1])                # STAT
    assert len(raw.multiline()) == count + 2          # LIST
    assert len(raw.multiline()) == count + 2          # UIDL
    assert raw.line().startswith(b"+OK")              # NOOP
    assert raw.line().startswith(b"+OK")              # QUIT
    assert raw.closed()

    raw = Raw(gateway.pop3_port)
    raw.send(b"AUTH PLAIN " + plain("bob@example.com", "bob-secret") + b"\r\nSTAT\r\nQUIT\r\n")
    assert [raw.line()[:3] for _ in range(3)] == [b"+OK"] * 3
    assert raw.closed()


# -- failures -------------------------------------------------------------------------------------

def test_wrong_password_and_unknown_user_are_identical(gateway):
    answers = []
    raw = Raw(gateway.pop3_port)
    for user, password in (("alice@example.com", "wrong"), ("nobody@example.com", "wrong")):
        raw.send(f"USER {user}\r\nPASS {password}\r\n".encode())
        assert raw.line().startswith(b"+OK")
        answers.append(raw.line())
    for authcid in ("bob@example.com", "nobody@example.com"):
        raw.send(b"AUTH PLAIN " + plain(authcid, "wrong") + b"\r\n")
        answers.append(raw.line())
    assert answers == [AUTH_FAILED] * 4
    raw.send(b"USER alice@example.com\r\nPASS alice-secret\r\nSTAT\r\n")   # retry is allowed
    assert [raw.line()[:3] for _ in range(3)] == [b"+OK"] * 3


def test_backend_down_is_a_temporary_failure(make_gateway):
    dead_port = servers.free_port()
    gateway = make_gateway(backends={"DOWN": ("127.0.0.1", dead_port, dead_port)},
                           routes={"alice@example.com": "DOWN"}, protocols=("pop3",))
    raw = Raw(gateway.pop3_port)
    for _ in range(2):
        raw.send(b"USER alice@example.com\r\nPASS alice-secret\r\n")
        assert raw.line().startswith(b"+OK")
        assert raw.line().startswith(b"-ERR [SYS/TEMP] ")
    raw.send(b"CAPA\r\n")
    assert raw.multiline()[0].startswith(b"+OK")


def test_redis_down_is_a_temporary_failure(make_gateway):
    gateway = make_gateway(redis_url=f"redis://127.0.0.1:{servers.free_port()}/0",
                           protocols=("pop3",))
    raw = Raw(gateway.pop3_port)
    raw.send(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n")
    assert raw.line().startswith(b"-ERR [SYS/TEMP] ")


INJECTIONS = [
    # (what the client sends, why it must not reach the back-end as a command)
    b"AUTH PLAIN " + plain("carol@example.com", "carol-secret\r\nDELE 1\r\nQUIT") + b"\r\n",
    b"AUTH PLAIN " + plain("carol@example.com\r\nDELE 1", "carol-secret") + b"\r\n",
    b"AUTH PLAIN " + plain("carol@example.com", "x", "carol@example.com\r\nDELE 1") + b"\r\n",
    b"USER carol@example.com\rDELE 1\r\nPASS carol-secret\r\n",
    b"USER carol@example.com\r\nPASS carol-secret\rDELE 1\r\n",
    b"USER carol@example.com\x00DELE 1\r\nPASS carol-secret\r\n",
]


def test_injection_in_login_arguments_never_becomes_a_command(gateway, dovecot_a):
    dovecot_a.deliver("carol@example.com", unique_message(f"pop3-inject-{time.time_ns()}"))
    direct = dovecot_a.pop3("carol@example.com")
    before = (direct.stat(), direct.uidl())
    direct.quit()
    log_start = len(dovecot_a.log_text())
    for attempt in INJECTIONS:   # one connection each: 5 failed logins close a session
        raw = Raw(gateway.pop3_port)
        raw.send(attempt)
        answer = raw.line()
        if answer == b"+OK":       # USER is accepted; the PASS that follows fails
            answer = raw.line()
        assert answer == AUTH_FAILED, attempt
        raw.send(b"NOOP\r\nQUIT\r\n")   # still in step, still before login
        assert raw.line().startswith(b"-ERR") and raw.line().startswith(b"+OK")
    direct = dovecot_a.pop3("carol@example.com")
    try:
        assert (direct.stat(), direct.uidl()) == before
    finally:
        direct.quit()
    # Only the check above logged in: no injected line ever ran in a mail session.
    login = "pop3-login: Info: Login: user=<carol@example.com>"
    new_log = wait_for_log(dovecot_a, lambda text: login in text[log_start:])[log_start:]
    assert new_log.count(login) == 1
    assert "auth failed" in new_log and "del=1/" not in new_log


def test_timeouts_before_and_after_login(make_gateway):
    gateway = make_gateway(routes={"bob@example.com": "B"}, protocols=("pop3",),
                           sections={"pop3": {"preauth_timeout": 1, "idle_timeout": 1}})
    raw = Raw(gateway.pop3_port)
    assert raw.line() == b"-ERR Disconnected for inactivity."
    assert raw.closed()
    raw = Raw(gateway.pop3_port)
    raw.send(b"USER bob@example.com\r\nPASS bob-secret\r\n")
    assert raw.line().startswith(b"+OK") and raw.line().startswith(b"+OK")
    assert raw.line() == b"-ERR Disconnected for inactivity."
    assert raw.closed()


def test_backend_lost_mid_session_gives_err_and_close(gateway, dovecot_a):
    raw = Raw(gateway.pop3_port)
    raw.send(b"USER carol@example.com\r\nPASS carol-secret\r\nSTAT\r\n")
    assert [raw.line()[:3] for _ in range(3)] == [b"+OK"] * 3
    subprocess.run(["doveadm", "-c", str(dovecot_a.config_path), "kick", "carol@example.com"],
                   check=True, capture_output=True, timeout=20)
    lines = []
    with pytest.raises(EOFError):
        while len(lines) < 5:
            lines.append(raw.line())
    assert lines and all(line.startswith(b"-ERR") for line in lines)


# -- the session log ------------------------------------------------------------------------------

def test_session_log_and_client_address_forwarded(gateway, dovecot_a):
    def session_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if "proto=pop3 client=127.0.0.1 " in line
                and "login=alice@example.com backend=A" in line]

    seen = len(session_lines(gateway.log_text()))
    client = pop_gateway(gateway, "alice@example.com")
    client.stat()
    client.quit()
    text = wait_for_log(gateway, lambda t: len(session_lines(t)) > seen)
    assert "proto=pop3 login=alice@example.com backend=A mechanism=USER" in text
    ends = session_lines(text)
    assert "end=quit" in ends[-1]
    # XCLIENT: Dovecot knows the session by the gateway's id, with the client's address.
    tag = "session=<" + ends[-1].split("session=")[1].split()[0] + ">"
    backend_log = wait_for_log(dovecot_a, lambda t: tag in t)
    (login_line,) = [line for line in backend_log.splitlines() if tag in line and "Login:" in line]
    assert "user=<alice@example.com>" in login_line and "rip=127.0.0.1," in login_line
    for password in PASSWORDS.values():
        assert password not in text
    for secret in (b"carol-secret\r\nDELE", b"alice-secret\r\n"):
        assert base64.b64encode(secret).decode() not in text
