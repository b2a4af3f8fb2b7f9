"""Issue 12's attacks on the pre-login dialogue and the back-end login, reproduced against
the real gateway and Dovecot: each test first does what the attacker did, then asserts the
gateway's behaviour (never a duration)."""
from __future__ import annotations

import base64
import imaplib
import socket
import threading
import time

import pytest

import servers
from clients import ImapRaw, Pop3Raw

USER, PASSWORD = "alice@example.com", "alice-secret"


@pytest.fixture
def bounded_gateway(make_gateway):
    return make_gateway(routes={USER: "A", "bob@example.com": "B"}, workers=1,
                        sections={"imap": {"login_deadline": 3},
                                  "pop3": {"login_deadline": 3}})


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_a_flooding_client_does_not_freeze_its_worker(bounded_gateway, protocol):
    """Item 1: one client pipelining NOOPs (POP3: CAPA) as fast as it can; another client of
    the same (single) worker keeps getting answers, and the heartbeat does not kill it."""
    pids = bounded_gateway.worker_pids()
    stop = threading.Event()
    port = bounded_gateway.imap_port if protocol == "imap" else bounded_gateway.pop3_port
    flood = socket.create_connection(("127.0.0.1", port), timeout=10)
    burst = (b"a NOOP\r\n" if protocol == "imap" else b"CAPA\r\n") * 4096

    def flooding() -> None:
        reader = threading.Thread(target=lambda: _drain(flood, stop), daemon=True)
        reader.start()
        try:
            while not stop.is_set():
                flood.sendall(burst)
        except OSError:
            pass

    thread = threading.Thread(target=flooding, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)        # the flood is running
        other = ImapRaw(bounded_gateway.imap_port, timeout=10)
        for index in range(20):
            other.send(b"n%d NOOP\r\n" % index)
            assert other.until_tagged(b"n%d" % index)[-1].startswith(b"n%d OK" % index)
        other.close()
    finally:
        stop.set()
        flood.close()
        thread.join(10)
    assert bounded_gateway.worker_pids() == pids


def wait_for_log(gateway, text: str, timeout: float = 10) -> bool:
    """Whether ``text`` shows up in the gateway's log (a session's line follows its close)."""
    deadline = time.monotonic() + timeout
    while text not in gateway.log_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    try:
        while not stop.is_set() and sock.recv(65536):
            pass
    except OSError:
        pass


def test_one_pre_login_command_has_a_total_size_bound(bounded_gateway):
    """Item 2: literals each under max_login_literal, together far over any login."""
    raw = ImapRaw(bounded_gateway.imap_port)
    raw.send(b"a LOGIN {8192+}\r\n" + b"x" * 8192)
    try:
        for _ in range(200):
            raw.send(b" {8192+}\r\n" + b"y" * 8192)
    except OSError:
        pass      # the gateway closed while we were still sending: what we want
    lines = []
    try:
        while True:
            lines.append(raw.line())
    except (EOFError, OSError):
        pass
    assert any(line.startswith(b"* BYE [TOOBIG]") for line in lines)
    assert wait_for_log(bounded_gateway, 'end="command too large')


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_slowloris_meets_the_login_deadline(bounded_gateway, protocol):
    """Item 4: one byte a second resets an idle timer for ever; the total deadline ends it
    (for POP3: a line that never gets its LF)."""
    port = bounded_gateway.imap_port if protocol == "imap" else bounded_gateway.pop3_port
    client = (ImapRaw if protocol == "imap" else Pop3Raw)(port, timeout=30)
    goodbye = b""
    for byte in b"a NOOP NOOP NOOP NOOP NOOP NOOP NOOP":
        try:
            client.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.5)
        client.sock.settimeout(0.01)
        try:
            goodbye += client.sock.recv(4096)
        except socket.timeout:
            pass
        except OSError:
            break
        finally:
            client.sock.settimeout(30)
        if goodbye:
            break
    expected = b"* BYE Autologout; login took too long." if protocol == "imap" \
        else b"-ERR Disconnected: login took too long."
    assert goodbye.startswith(expected)
    assert client.closed()


def test_literal_plus_pipelined_behind_login_is_relayed(bounded_gateway):
    """Item 6: LOGIN and an APPEND with a 20000-byte LITERAL+ in one write."""
    message = b"Subject: pipelined\r\n\r\n" + b"z" * (20000 - 22)
    raw = ImapRaw(bounded_gateway.imap_port)
    raw.send(b'a LOGIN "%s" "%s"\r\nb APPEND INBOX {%d+}\r\n' % (
        USER.encode(), PASSWORD.encode(), len(message)) + message + b"\r\nc LOGOUT\r\n")
    assert raw.until_tagged(b"a")[-1].startswith(b"a OK")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")
    assert raw.until_tagged(b"c")[-1].startswith(b"c OK")


def test_a_literal_as_sasl_answer_gets_an_answer(bounded_gateway):
    """Item 9: a literal where a SASL answer line belongs: BAD and BYE, not a silent close."""
    raw = ImapRaw(bounded_gateway.imap_port)
    raw.send(b"a AUTHENTICATE PLAIN\r\n")
    assert raw.line().startswith(b"+")
    raw.send(b"{5+}\r\nhello\r\n")
    assert raw.line().startswith(b"a BAD")
    assert raw.line().startswith(b"* BYE")
    assert raw.closed()


@pytest.mark.parametrize("marker", [b"~{5}", b"~{5+}"])
def test_literal8_is_refused_in_login(bounded_gateway, marker):
    raw = ImapRaw(bounded_gateway.imap_port)
    raw.send(b"a LOGIN " + marker + b"\r\n")
    if marker.endswith(b"+}"):
        raw.send(b"alice \"x\"\r\n")
    assert raw.line().startswith(b"a BAD")
    raw.send(b"b NOOP\r\n")          # the session goes on, in step
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")


def test_an_over_long_auth_plain_is_an_authentication_failure(bounded_gateway):
    """Item 9: a 12000-byte password (Dovecot's auth process drops such a request, which
    was answered NO [UNAVAILABLE]) is a failed login like any wrong password."""
    token = base64.b64encode(b"\0" + USER.encode() + b"\0" + b"p" * 12000)
    raw = ImapRaw(bounded_gateway.imap_port)
    raw.send(b"a AUTHENTICATE PLAIN " + token + b"\r\n")
    assert raw.line().startswith(b"a NO [AUTHENTICATIONFAILED]")
    raw.send(b"b AUTHENTICATE PLAIN\r\n")
    assert raw.line().startswith(b"+")
    raw.send(token + b"\r\n")
    assert raw.line().startswith(b"b NO [AUTHENTICATIONFAILED]")
    pop = Pop3Raw(bounded_gateway.pop3_port)     # a POP3 line stays under its 8192 bytes
    pop.send(b"AUTH PLAIN " + base64.b64encode(b"\0bob@example.com\0" + b"p" * 5000) + b"\r\n")
    assert pop.line().startswith(b"-ERR [AUTH]")


def test_sasl_login_mechanism(bounded_gateway):
    """AUTHENTICATE LOGIN / AUTH LOGIN, with and without the initial response, "*" cancels."""
    client = imaplib.IMAP4("127.0.0.1", bounded_gateway.imap_port, timeout=15)
    answers = iter([USER.encode(), PASSWORD.encode()])
    typ, _ = client.authenticate("LOGIN", lambda challenge: next(answers))
    assert typ == "OK"
    client.logout()
    b64 = lambda text: base64.b64encode(text.encode())   # noqa: E731
    raw = ImapRaw(bounded_gateway.imap_port)
    raw.send(b"a AUTHENTICATE LOGIN " + b64(USER) + b"\r\n")
    assert raw.line() == b"+ " + base64.b64encode(b"Password:")
    raw.send(b"*\r\n")
    assert raw.line().startswith(b"a BAD")
    raw.send(b"b AUTHENTICATE LOGIN " + b64(USER) + b"\r\n")
    raw.line()
    raw.send(b64(PASSWORD) + b"\r\n")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")
    pop = Pop3Raw(bounded_gateway.pop3_port)
    pop.send(b"AUTH LOGIN\r\n")
    assert pop.line() == b"+ " + base64.b64encode(b"Username:")
    pop.send(b64("bob@example.com") + b"\r\n")
    assert pop.line() == b"+ " + base64.b64encode(b"Password:")
    pop.send(b64("bob-secret") + b"\r\nSTAT\r\n")
    assert pop.line().startswith(b"+OK")
    assert pop.line().startswith(b"+OK")
    pop = Pop3Raw(bounded_gateway.pop3_port)
    pop.send(b"AUTH LOGIN " + b64("bob@example.com") + b"\r\n")
    pop.line()
    pop.send(b"*\r\n")
    assert pop.line().startswith(b"-ERR")


def slow_backend(make_gateway, serve, timeout: float):
    """A gateway whose only back-end, SLOW (``timeout`` for connect and for login), is a
    listener whose first connection ``serve(conn)`` handles in a thread."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            serve(conn)
        finally:
            conn.close()
            listener.close()

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    return make_gateway(routes={"slow@example.com": "SLOW"}, backends={
        "SLOW": {"address": "127.0.0.1", "imap_port": port, "pop3_port": port,
                 "connect_timeout": timeout, "login_timeout": timeout}})


def test_a_backend_that_trickles_cannot_hold_the_login(make_gateway):
    """Item 5: a back-end sending one byte every 0.4 s; the login ends within the back-end's
    connect_timeout + login_timeout with NO [UNAVAILABLE], and its connection is closed."""
    closed = threading.Event()

    def trickle(conn: socket.socket) -> None:
        try:
            for byte in b"* OK [CAPABILITY IMAP4rev1] slow\r\n" * 10:
                conn.sendall(bytes([byte]))
                time.sleep(0.4)
        except OSError:
            closed.set()

    gateway = slow_backend(make_gateway, trickle, 1)
    raw = ImapRaw(gateway.imap_port, timeout=30)
    raw.send(b'a LOGIN "slow@example.com" "x"\r\n')
    assert raw.line().startswith(b"a NO [UNAVAILABLE]")
    assert closed.wait(10)


def test_a_backend_pointing_at_the_gateway_itself_ends_in_unavailable(make_gateway, monkeypatch):
    """Issue 9 item 6: x-proxy-ttl stops a proxy loop after a few hops, not a storm."""
    port = servers.free_port()
    gateway = make_gateway(start=False, protocols=("imap",),
                           backends={"SELF": ("127.0.0.1", port, port)})
    monkeypatch.setattr(servers, "free_port", lambda: port)
    gateway.start()
    gateway.route({"loop@example.com": "SELF"})
    raw = ImapRaw(gateway.imap_port, timeout=30)
    raw.send(b'a LOGIN "loop@example.com" "x"\r\n')
    assert raw.line().startswith(b"a NO [UNAVAILABLE]")
    log = gateway.log_text()
    assert log.count("proxy TTL reached zero") == 1
    assert log.count("login failed") <= 6


def test_a_client_hanging_up_during_the_backend_login_closes_it(make_gateway):
    """Item 5: the back-end is slow to greet; the client leaves; the back-end connection is
    closed at once, not when the back-end answers or its (long) timeouts run out."""
    accepted, closed = threading.Event(), threading.Event()

    def silent(conn: socket.socket) -> None:
        accepted.set()
        conn.settimeout(60)
        try:
            if conn.recv(1) == b"":
                closed.set()
        except OSError:
            closed.set()

    gateway = slow_backend(make_gateway, silent, 60)
    raw = ImapRaw(gateway.imap_port, timeout=30)
    raw.send(b'a LOGIN "slow@example.com" "x"\r\n')
    assert accepted.wait(10)
    raw.close()
    assert closed.wait(20)          # far below the back-end's 120 s of timeouts
    assert wait_for_log(gateway, 'end="client closed during the back-end login"')
