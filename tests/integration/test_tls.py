"""Client TLS with real clients: IMAPS, STARTTLS, POP3S, STLS, SNI, resumption, many
handshakes at once, the handshake bound, require_tls_for_login and the STARTTLS
command-injection class, and the relay after login over TLS (large literals, IDLE)."""
from __future__ import annotations

import hashlib
import imaplib
import poplib
import socket
import ssl
import threading
import time

import pytest
from imapclient import IMAPClient

from certs import TestCA
from clients import unique_message, wait_for_exists
from conftest import ROUTES, USERS_A, USERS_B, _spawn_gateway

ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


def tls_listeners(require: bool = True) -> dict:
    return {
        "imap": {"protocol": "imap", "tls": "starttls", "require_tls_for_login": require},
        "imaps": {"protocol": "imap", "tls": "implicit"},
        "pop3": {"protocol": "pop3", "tls": "starttls", "require_tls_for_login": require},
        "pop3s": {"protocol": "pop3", "tls": "implicit"},
    }


def tls_sections(ca, tmp) -> tuple[dict, str]:
    cert, key = ca.issue("gateway", ["mail.example.test", "127.0.0.1", "localhost"])
    other_cert, other_key = ca.issue("other", ["other.example.test"])
    extra = ("[[tls.certificates]]\n"
             f'cert_file = "{other_cert}"\nkey_file = "{other_key}"\n'
             'server_names = ["other.example.test", "*.wild.example.test"]\n')
    return {"tls": {"cert_file": str(cert), "key_file": str(key),
                    "handshake_timeout": 2}}, extra


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b, ca):
    sections, extra = tls_sections(ca, tmp_path_factory.mktemp("tlscerts"))
    # One worker: 200 handshakes at once all meet the same gevent loop.
    gw = _spawn_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b, workers=1,
                        listeners=tls_listeners(), sections=sections, extra_toml=extra)
    try:
        gw.start()
        gw.route(ROUTES)
        yield gw
    finally:
        gw.stop()


def session_line(gateway, sock) -> str:
    """The gateway's end-of-session log line of the client bound to ``sock`` (an address
    tuple; waits for the line)."""
    marker = "client=%s port=%d " % tuple(sock)[:2]
    deadline = time.monotonic() + 15
    while True:
        for line in gateway.log_text().splitlines():
            if marker in line and "state=" in line:
                return line
        assert time.monotonic() < deadline, f"no session line with {marker}"
        time.sleep(0.05)


def client_context(ca) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False    # the address is an IP; the chain is still verified
    return context


# -- implicit TLS and STARTTLS -------------------------------------------------------------------

def test_imaps_login_select_logout(tls_gateway, ca):
    with imaplib.IMAP4_SSL("127.0.0.1", tls_gateway.ports["imaps"],
                           ssl_context=client_context(ca), timeout=15) as client:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert client.login(ALICE, USERS_A[ALICE])[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        client.logout()


def test_starttls_then_login(tls_gateway, ca):
    client = imaplib.IMAP4("127.0.0.1", tls_gateway.ports["imap"], timeout=15)
    try:
        assert "STARTTLS" in client.capabilities
        assert "LOGINDISABLED" in client.capabilities
        assert "AUTH=PLAIN" not in client.capabilities
        typ, _ = client.starttls(ssl_context=client_context(ca))
        assert typ == "OK"
        assert "STARTTLS" not in client.capabilities        # re-read after TLS
        assert "LOGINDISABLED" not in client.capabilities
        assert client.login(BOB, USERS_B[BOB])[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_login_refused_before_starttls(tls_gateway):
    raw = socket.create_connection(("127.0.0.1", tls_gateway.ports["imap"]), timeout=10)
    name = raw.getsockname()
    try:
        assert b"LOGINDISABLED" in raw.recv(4096)
        raw.sendall(b"a LOGIN alice@example.com alice-secret\r\n")
        assert raw.recv(4096).startswith(b"a NO [PRIVACYREQUIRED]")
        raw.sendall(b"b AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUuY29tAGFsaWNlLXNlY3JldA==\r\n")
        assert raw.recv(4096).startswith(b"b NO [PRIVACYREQUIRED]")
    finally:
        raw.close()
    assert " login=- " in session_line(tls_gateway, name)


def test_pipelined_plaintext_after_starttls_is_discarded(tls_gateway, ca):
    """The STARTTLS command injection: "b LOGIN" sent in clear with STARTTLS never runs."""
    raw = socket.create_connection(("127.0.0.1", tls_gateway.ports["imap"]), timeout=10)
    raw.recv(4096)
    raw.sendall(b"a STARTTLS\r\nb CAPABILITY\r\n")
    answer = raw.recv(4096)
    assert answer.startswith(b"a OK")
    assert b"b " not in answer
    tls = client_context(ca).wrap_socket(raw)
    tls.sendall(b"c NOOP\r\n")
    data = b""
    while b"c OK" not in data:
        chunk = tls.recv(4096)
        assert chunk, data
        data += chunk
    assert b"b OK" not in data and b"* CAPABILITY" not in data   # "b" never executed
    tls.close()
    # And a LOGIN pipelined in clear text is never tried either.
    raw = socket.create_connection(("127.0.0.1", tls_gateway.ports["imap"]), timeout=10)
    name = raw.getsockname()
    raw.recv(4096)
    raw.sendall(b"a STARTTLS\r\nb LOGIN carol@example.com carol-secret\r\n")
    assert raw.recv(4096).startswith(b"a OK")
    tls = client_context(ca).wrap_socket(raw)
    tls.sendall(b"c NOOP\r\n")
    data = b""
    while b"c OK" not in data:
        data += tls.recv(4096)
    assert b"b " not in data
    tls.close()
    assert " login=- " in session_line(tls_gateway, name)


def test_pop3s_and_stls(tls_gateway, ca):
    client = poplib.POP3_SSL("127.0.0.1", tls_gateway.ports["pop3s"],
                             context=client_context(ca), timeout=15)
    try:
        assert "STLS" not in client.capa()
        client.user(BOB)
        assert client.pass_(USERS_B[BOB]).startswith(b"+OK")
        client.stat()
    finally:
        client.quit()
    client = poplib.POP3("127.0.0.1", tls_gateway.ports["pop3"], timeout=15)
    try:
        capa = client.capa()
        assert "STLS" in capa and "USER" not in capa
        with pytest.raises(poplib.error_proto, match="Plaintext authentication disallowed"):
            client.user(BOB)
        assert client.stls(context=client_context(ca)).startswith(b"+OK")
        assert "USER" in client.capa() and "STLS" not in client.capa()
        client.user(BOB)
        assert client.pass_(USERS_B[BOB]).startswith(b"+OK")
        client.stat()
    finally:
        client.quit()


def test_stls_discards_pipelined_plaintext(tls_gateway, ca):
    raw = socket.create_connection(("127.0.0.1", tls_gateway.ports["pop3"]), timeout=10)
    raw.recv(4096)
    raw.sendall(b"STLS\r\nUSER bob@example.com\r\n")
    assert raw.recv(4096).startswith(b"+OK Begin TLS")
    tls = client_context(ca).wrap_socket(raw)
    tls.sendall(b"PASS bob-secret\r\n")
    assert tls.recv(4096).startswith(b"-ERR No user name given")   # USER never ran
    tls.close()


def test_no_starttls_on_implicit_or_plain_listeners(tls_gateway, ca, gateway):
    with imaplib.IMAP4_SSL("127.0.0.1", tls_gateway.ports["imaps"],
                           ssl_context=client_context(ca), timeout=15) as client:
        assert "STARTTLS" not in client.capabilities
        assert "LOGINDISABLED" not in client.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            client._simple_command("STARTTLS")    # BAD: already TLS
    raw = socket.create_connection(("127.0.0.1", gateway.imap_port), timeout=10)
    assert b"STARTTLS" not in raw.recv(4096)
    raw.sendall(b"a STARTTLS\r\n")
    assert raw.recv(4096).startswith(b"a BAD")
    raw.close()


# -- certificates, versions, resumption -------------------------------------------------------

def test_sni_picks_the_certificate(tls_gateway, ca):
    context = ssl.create_default_context(cafile=str(ca.path))
    for name in ("other.example.test", "mail.example.test"):
        with socket.create_connection(("127.0.0.1", tls_gateway.ports["imaps"]), 10) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:   # hostname checked
                cert = tls.getpeercert()
                assert dict(x[0] for x in cert["subject"])["commonName"] == name
    context.check_hostname = False
    for name, expected in (("x.wild.example.test", "other.example.test"),
                           ("a.b.wild.example.test", "mail.example.test"),   # one label only
                           ("unknown.example.test", "mail.example.test")):  # the default
        with socket.create_connection(("127.0.0.1", tls_gateway.ports["imaps"]), 10) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                cert = tls.getpeercert()
                assert dict(x[0] for x in cert["subject"])["commonName"] == expected, name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_refused_and_session_resumed(tls_gateway, ca):
    old = client_context(ca)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", tls_gateway.ports["imaps"]), 10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            old.wrap_socket(raw)
    context = client_context(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2   # sessions before the first read
    session = None
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", tls_gateway.ports["imaps"]), 10) as raw:
            with context.wrap_socket(raw, session=session) as tls:
                tls.recv(4096)
                if attempt:
                    assert tls.session_reused
                session = tls.session


def test_sessions_resume_on_any_worker(tmp_path_factory, redis_server, dovecot_a, dovecot_b,
                                       ca):
    """The server contexts (and so the session ticket keys) are made in the master before
    the fork: a client resumes on whichever worker takes its connection.  One connection
    per worker ([server] max_connections = 1: a full worker stops accepting), each held
    open until the next is up, so that no two in a row meet the same worker."""
    sections, extra = tls_sections(ca, tmp_path_factory.mktemp("tlscerts-workers"))
    gw = _spawn_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b, workers=3,
                        listeners=tls_listeners(), sections=sections, extra_toml=extra,
                        server_overrides={"max_connections": 1})
    try:
        gw.start()
        context = client_context(ca)
        session, held, reused, addresses = None, None, [], []
        for attempt in range(8):
            raw = socket.create_connection(("127.0.0.1", gw.ports["imaps"]), 10)
            tls = context.wrap_socket(raw, session=session)
            assert tls.recv(4096).startswith(b"* OK")   # TLS 1.3 tickets come before it
            if attempt:
                reused.append(tls.session_reused)
            session = tls.session
            addresses.append(tls.getsockname())
            if held is not None:
                held.close()
            held = tls
        held.close()
        assert all(reused), reused
        pids = [_serving_pid(gw, address) for address in addresses]
        assert all(a != b for a, b in zip(pids, pids[1:])), pids
    finally:
        gw.stop()


def _serving_pid(gateway, address) -> int:
    """The worker that served the client at ``address`` (its session-end log line)."""
    marker = "client=%s port=%d " % tuple(address)[:2]
    deadline = time.monotonic() + 15
    while True:
        for line in gateway.log_text().splitlines():
            if marker in line and "event=session-end" in line:
                return int(line.split("[", 1)[1].split("]", 1)[0])
        assert time.monotonic() < deadline, f"no session line with {marker}"
        time.sleep(0.05)


def test_many_concurrent_handshakes(tls_gateway, ca):
    """200 threads connect at once (a barrier releases them together): every handshake
    completes and every client gets its greeting from the one gevent worker."""
    context = client_context(ca)
    count = 200
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def handshake(index: int) -> None:
        barrier.wait(60)
        try:
            with socket.create_connection(("127.0.0.1", tls_gateway.ports["imaps"]), 60) as raw:
                with context.wrap_socket(raw) as tls:
                    results[index] = tls.recv(4096)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[index] = exc

    threads = [threading.Thread(target=handshake, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    failures = [r for r in results if not (isinstance(r, bytes) and r.startswith(b"* OK"))]
    assert failures == []


def test_silent_client_is_closed_after_the_handshake_timeout(tls_gateway):
    raw = socket.create_connection(("127.0.0.1", tls_gateway.ports["imaps"]), timeout=30)
    try:
        assert raw.recv(1) == b""        # handshake_timeout = 2 s in this config
    finally:
        raw.close()
    deadline = time.monotonic() + 10
    while "TLS handshake timed out" not in tls_gateway.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)


# -- the relay over TLS -------------------------------------------------------------------------

def test_large_append_and_fetch_byte_identical_over_tls(tls_gateway, ca, dovecot_a):
    message = unique_message("tls-20mb", 20 * 1024 * 1024)
    with imaplib.IMAP4_SSL("127.0.0.1", tls_gateway.ports["imaps"],
                           ssl_context=client_context(ca), timeout=120) as client:
        client.login(ALICE, USERS_A[ALICE])
        client.create("TlsBig")
        assert client.append("TlsBig", None, None, message)[0] == "OK"
        client.select("TlsBig")
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        body = data[0][1]
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(message).hexdigest()
        client.close()
        client.delete("TlsBig")
        client.logout()


def test_idle_over_tls(tls_gateway, ca, dovecot_b):
    with IMAPClient("127.0.0.1", port=tls_gateway.ports["imaps"], ssl=True,
                    ssl_context=client_context(ca), timeout=30) as client:
        client.login(BOB, USERS_B[BOB])
        client.select_folder("INBOX")
        client.idle()
        dovecot_b.deliver(BOB, unique_message("tls-idle"))
        assert wait_for_exists(client)
        client.idle_done()
        client.logout()


def test_commands_pipelined_with_the_login_over_tls(tls_gateway, ca):
    """Plaintext already decrypted into OpenSSL's buffer at login (SSL_pending, no event on
    the descriptor) reaches the back-end: 300 NOOPs in the LOGIN's write are all answered."""
    raw = socket.create_connection(("127.0.0.1", tls_gateway.ports["imaps"]), timeout=30)
    tls = client_context(ca).wrap_socket(raw)
    tls.recv(4096)
    noops = b"".join(b"n%d NOOP\r\n" % i for i in range(300))
    tls.sendall(b"a LOGIN alice@example.com alice-secret\r\n" + noops + b"z LOGOUT\r\n")
    data = b""
    while b"z OK" not in data:
        chunk = tls.recv(65536)
        assert chunk, data[-500:]
        data += chunk
    assert b"a OK" in data and all(b"n%d OK" % i in data for i in range(300))
    tls.close()


def test_tls_client_hanging_up_during_a_slow_backend_login(make_gateway, ca, tmp_path):
    """The session watches its client while the back-end is slow; over TLS the peek at the
    client goes through OpenSSL (a close_notify or EOF ends the login at once)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted, closed = threading.Event(), threading.Event()

    def silent_backend():
        conn, _ = listener.accept()
        accepted.set()
        conn.settimeout(60)
        try:
            conn.recv(1)
        except OSError:
            pass
        closed.set()
        conn.close()

    threading.Thread(target=silent_backend, daemon=True).start()
    sections, extra = tls_sections(ca, tmp_path)
    gw = make_gateway(listeners={"imaps": {"protocol": "imap", "tls": "implicit"}},
                      sections=sections, extra_toml=extra,
                      backends={"SLOW": {"address": "127.0.0.1",
                                         "imap_port": listener.getsockname()[1],
                                         "connect_timeout": 60, "login_timeout": 60}},
                      routes={"slow@example.com": "SLOW"})
    raw = socket.create_connection(("127.0.0.1", gw.ports["imaps"]), timeout=30)
    tls = client_context(ca).wrap_socket(raw)
    tls.recv(4096)
    tls.sendall(b"a LOGIN slow@example.com x\r\n")
    assert accepted.wait(20)
    tls.close()
    assert closed.wait(20)
    deadline = time.monotonic() + 20
    while 'end="client closed during the back-end login"' not in gw.log_text():
        assert time.monotonic() < deadline, gw.log_text()[-2000:]
        time.sleep(0.05)
    assert "Traceback" not in gw.log_text()
    listener.close()
