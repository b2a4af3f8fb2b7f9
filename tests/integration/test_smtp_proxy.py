"""SMTP submission end to end: smtplib and raw sockets → gateway subprocess → Dovecot's
submission service → a private Postfix → the recipient's Maildir, read back over IMAP."""
from __future__ import annotations

import base64
import hashlib
import imaplib
import smtplib
import subprocess
import sys
import time

import pytest

import servers
from clients import LineClient, data_segments_in, unique_message
from conftest import USERS_A, USERS_B, require_binary
from mta import Postfix
from ops_helpers import scrape, scrape_text, total, wait_until

PASSWORDS = {**USERS_A, **USERS_B}
AUTH_FAILED = b"535 5.7.8 Authentication credentials invalid"


class SmtpRaw(LineClient):
    def reply(self) -> list[bytes]:
        """One (multi-line) reply."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def command(self, line: bytes) -> list[bytes]:
        self.send(line + b"\r\n")
        return self.reply()


def plain(authcid: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


@pytest.fixture(scope="module")
def mail_system(tmp_path_factory):
    """Two Dovecots (A: alice, carol, weird; B: bob, dave) whose submission services relay
    to one Postfix that delivers into their Maildirs."""
    require_binary("dovecot", "dovecot-imapd dovecot-pop3d dovecot-submissiond")
    require_binary("postfix", "postfix")
    if not Postfix.usable():
        pytest.skip("a private Postfix needs root")
    mta_port = servers.free_port()
    started = []
    try:
        backends = {}
        for name, users in (("A", USERS_A), ("B", USERS_B)):
            dovecot = servers.Dovecot(tmp_path_factory.mktemp(f"smtp-dovecot-{name}"), name,
                                      users, submission_relay=(servers.LOOPBACK, mta_port))
            started.append(dovecot.start())
            backends[name] = dovecot
        mailboxes = {user: dovecot.maildir(user)
                     for dovecot in backends.values() for user in dovecot.users}
        mta = Postfix(tmp_path_factory.mktemp("postfix"), mailboxes, backends["A"].mail_uid,
                      backends["A"].mail_gid, port=mta_port)
        started.append(mta.start())
        yield backends["A"], backends["B"], mta
    finally:
        for server in reversed(started):
            server.stop()


def backend_table(dovecot) -> dict:
    return {"address": dovecot.host, "imap_port": dovecot.imap_port,
            "pop3_port": dovecot.pop3_port, "submission_port": dovecot.submission_port}


def start_gateway(tmp_path_factory, redis_server, mail_system, **kwargs):
    dovecot_a, dovecot_b, _ = mail_system
    kwargs.setdefault("backends", {"A": backend_table(dovecot_a), "B": backend_table(dovecot_b)})
    kwargs.setdefault("protocols", ("imap", "submission"))
    gateway = servers.GatewayProcess(tmp_path_factory.mktemp("smtp-gateway"),
                                     redis_url=redis_server.allocate_db(), **kwargs)
    try:
        gateway.start()
        gateway.route({**{u: "A" for u in USERS_A}, **{u: "B" for u in USERS_B}})
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_server, mail_system):
    gw = start_gateway(tmp_path_factory, redis_server, mail_system,
                       protocols=("imap", "submission", "health"))
    try:
        yield gw
    finally:
        gw.stop()


def smtp(gateway, **kwargs) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", gateway.submission_port, timeout=30, **kwargs)


def wait_for_message(gateway, user: str, marker: str, timeout: float = 60) -> bytes:
    """The message whose Subject is ``marker`` in ``user``'s INBOX, over IMAP through the
    gateway (Postfix delivers asynchronously)."""
    deadline = time.monotonic() + timeout
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=30)
    try:
        client.login(user, PASSWORDS[user])
        while True:
            client.select("INBOX")
            _, found = client.search(None, "HEADER", "Subject", marker)
            if found[0]:
                number = found[0].split()[-1]
                _, data = client.fetch(number, "(BODY.PEEK[])")
                return data[0][1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker} did not reach {user}'s INBOX in {timeout}s")
            time.sleep(0.2)
    finally:
        client.logout()


def body_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


def session_lines(gateway, ready) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = [l for l in gateway.log_text().splitlines()
                 if "proto=submission client=" in l]
        if ready(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# -- before AUTH ---------------------------------------------------------------------------------

def test_greeting_ehlo_and_transaction_before_auth(gateway):
    raw = SmtpRaw(gateway.submission_port)
    assert raw.greeting.startswith(b"220 ")
    assert b"Dovecot" not in raw.greeting and b"XCLIENT" not in raw.greeting
    assert raw.command(b"MAIL FROM:<alice@example.com>") == [b"530 5.7.0 Authentication required"]
    ehlo = raw.command(b"EHLO client.example")
    keywords = [line[4:] for line in ehlo[1:]]
    assert keywords == [b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SIZE 52428800",
                        b"AUTH PLAIN LOGIN", b"SMTPUTF8"]   # a plain listener: no STARTTLS
    for command in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.com>", b"DATA",
                    b"BDAT 10 LAST", b"VRFY bob"):
        assert raw.command(command)[0].startswith(b"530 5.7.0")
    assert raw.command(b"XCLIENT ADDR=192.0.2.1")[0].startswith(b"500 5.5.2")
    assert raw.command(b"NOOP " + b"x" * 600) == [b"500 5.5.2 Line too long"]
    assert raw.command(b"NOOP") == [b"250 2.0.0 OK"]
    assert raw.command(b"STARTTLS")[0].startswith(b"502 ")
    assert raw.command(b"QUIT") == [b"221 2.0.0 Bye"]
    assert raw.closed()


def test_the_tenth_error_is_answered_with_421_in_the_same_write_and_closed(gateway):
    raw = SmtpRaw(gateway.submission_port)
    try:
        for _ in range(9):
            assert raw.command(b"FROB")[0].startswith(b"500 5.5.2")
        before = data_segments_in(raw.sock)
        assert raw.command(b"FROB")[0].startswith(b"500 5.5.2")
        assert raw.reply() == [b"421 4.7.0 Too many errors, closing connection"]
        assert raw.closed()
        assert data_segments_in(raw.sock) - before == 1
    finally:
        raw.close()


def test_auth_plain_and_login_with_and_without_initial_response_and_cancel(gateway):
    raw = SmtpRaw(gateway.submission_port)
    assert raw.command(b"AUTH PLAIN " + plain("bob@example.com", "x"))[0].startswith(b"503")
    raw.command(b"EHLO client")
    assert raw.command(b"AUTH CRAM-MD5")[0].startswith(b"504 5.5.4")
    assert raw.command(b"AUTH PLAIN") == [b"334 "]
    assert raw.command(b"*") == [b"501 5.7.0 Authentication cancelled"]
    assert raw.command(b"AUTH LOGIN") == [b"334 VXNlcm5hbWU6"]
    assert raw.command(base64.b64encode(b"bob@example.com")) == [b"334 UGFzc3dvcmQ6"]
    assert raw.command(b"*") == [b"501 5.7.0 Authentication cancelled"]
    assert raw.command(b"AUTH PLAIN") == [b"334 "]
    assert raw.command(plain("bob@example.com", "bob-secret"))[0].startswith(b"235 2.7.0")
    raw.close()

    for first, then in ((b"AUTH LOGIN " + base64.b64encode(b"dave@example.com"),
                         [base64.b64encode(b"dave-secret")]),
                        (b"AUTH LOGIN", [base64.b64encode(b"dave@example.com"),
                                         base64.b64encode(b"dave-secret")]),
                        (b"AUTH PLAIN " + plain("carol@example.com", "carol-secret"), [])):
        raw = SmtpRaw(gateway.submission_port)
        raw.command(b"EHLO client")
        answer = raw.command(first)
        for line in then:
            assert answer[0].startswith(b"334 ")
            answer = raw.command(line)
        assert answer[0].startswith(b"235 2.7.0"), answer
        # After AUTH the back-end answers: its own EHLO list.
        assert raw.command(b"NOOP")[0].startswith(b"250")
        assert raw.command(b"QUIT")[0].startswith(b"221")
        raw.close()


def test_wrong_password_and_unknown_user_get_the_same_answer(gateway):
    answers = []
    for user, password in (("alice@example.com", "wrong"), ("nobody@example.com", "wrong"),
                           ("alice@example.com", "")):
        raw = SmtpRaw(gateway.submission_port)
        raw.command(b"EHLO client")
        answers.append(raw.command(b"AUTH PLAIN " + plain(user, password)))
        assert raw.command(b"MAIL FROM:<alice@example.com>")[0].startswith(b"530 5.7.0")
        raw.close()
    assert answers == [[AUTH_FAILED]] * 3
    with smtp(gateway) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            client.login("bob@example.com", "nope")
    with smtp(gateway) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as unknown:
            client.login("nobody@example.com", "nope")
    assert (wrong.value.smtp_code, wrong.value.smtp_error) == \
        (unknown.value.smtp_code, unknown.value.smtp_error) == (535, AUTH_FAILED[4:])


# -- sending through the gateway -------------------------------------------------------------------

def test_smtplib_sends_a_message_that_arrives_in_the_inbox(gateway, mail_system):
    dovecot_a = mail_system[0]
    marker = f"smtp-{time.time_ns()}"
    # From 127.0.0.2: the back-end must log that address (XCLIENT), not the gateway's.
    with smtp(gateway, source_address=("127.0.0.2", 0)) as client:
        client.ehlo()
        client.login("bob@example.com", "bob-secret")
        refused = client.sendmail("bob@example.com", ["alice@example.com"],
                                  unique_message(marker))
        assert refused == {}
    message = wait_for_message(gateway, "alice@example.com", marker)
    assert body_of(message) == b"hello\r\n"
    lines = session_lines(gateway, lambda found: any("127.0.0.2" in l for l in found))
    (line,) = [l for l in lines if "client=127.0.0.2 " in l]
    assert "login=bob@example.com backend=B" in line and "end=quit" in line
    session = line.split("session=")[1].split()[0]
    dovecot_b = mail_system[1]
    deadline = time.monotonic() + 10
    while f"session=<{session}>" not in dovecot_b.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    (login,) = [l for l in dovecot_b.log_text().splitlines()
                if f"session=<{session}>" in l and "Login:" in l]
    assert "submission-login" in login and "rip=127.0.0.2," in login
    assert "bob-secret" not in gateway.log_text()
    assert dovecot_a  # delivered to A's Maildir by Postfix, read back through the gateway


def test_twenty_megabyte_message_arrives_byte_identical(gateway):
    marker = f"big-{time.time_ns()}"
    message = unique_message(marker, 20 * 1024 * 1024)
    with smtp(gateway) as client:
        client.login("carol@example.com", "carol-secret")
        assert client.sendmail("carol@example.com", ["dave@example.com"], message) == {}
    delivered = wait_for_message(gateway, "dave@example.com", marker, timeout=120)
    assert hashlib.sha256(body_of(delivered)).hexdigest() == \
        hashlib.sha256(body_of(message)).hexdigest()


def test_pipelined_transaction_after_auth_and_rset(gateway):
    marker = f"pipe-{time.time_ns()}"
    raw = SmtpRaw(gateway.submission_port)
    raw.command(b"EHLO client")
    # AUTH with the transaction pipelined behind it: what the gateway read ahead goes on.
    raw.send(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n"
             b"MAIL FROM:<alice@example.com>\r\n")
    assert [raw.reply()[0][:3] for _ in range(2)] == [b"235", b"250"]
    # (Dovecot 2.3.19 relays a RSET pipelined behind MAIL after the next MAIL: not pipelined.)
    assert raw.command(b"RSET")[0].startswith(b"250")
    raw.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    replies = [raw.reply()[0] for _ in range(3)]
    assert [reply[:3] for reply in replies] == [b"250", b"250", b"354"], replies
    data = unique_message(marker).replace(b"hello", b".leading dot")
    raw.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    assert raw.reply()[0].startswith(b"250 2.0.0")
    assert raw.command(b"QUIT")[0].startswith(b"221")
    assert body_of(wait_for_message(gateway, "bob@example.com", marker)) == b".leading dot\r\n"


# -- limits and failures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory, redis_server, mail_system):
    """max_message_size 4096, preauth_timeout 3, a back-end whose submission port is closed,
    and an extra STARTTLS listener."""
    cert, key = servers.self_signed_certificate(tmp_path_factory.mktemp("smtp-cert"))
    dovecot_a, dovecot_b, _ = mail_system
    starttls_port = servers.free_port()
    gw = start_gateway(
        tmp_path_factory, redis_server, mail_system,
        backends={"A": backend_table(dovecot_a), "B": backend_table(dovecot_b),
                  "DOWN": {**backend_table(dovecot_a), "submission_port": servers.free_port()}},
        sections={"submission": {"max_message_size": 4096, "preauth_timeout": 3},
                  "tls": {"cert_file": str(cert), "key_file": str(key)}},
        extra_toml=f'[[listen]]\nprotocol = "submission"\naddress = "127.0.0.1:{starttls_port}"\n'
                   f'tls = "starttls"\nrequire_tls_for_login = true\n')
    gw.starttls_port = starttls_port
    try:
        yield gw
    finally:
        gw.stop()


def test_message_over_the_size_limit_is_refused_with_552(small_gateway):
    with smtp(small_gateway) as client:
        client.login("alice@example.com", "alice-secret")
        assert client.ehlo()[0] == 250
        code, text = client.mail("alice@example.com", ["SIZE=5000"])
        assert (code, text[:5]) == (552, b"5.3.4")
    marker = f"toobig-{time.time_ns()}"
    with smtp(small_gateway) as client:
        client.login("alice@example.com", "alice-secret")
        del client.esmtp_features["size"]    # no SIZE= announced: the content is counted
        with pytest.raises(smtplib.SMTPDataError) as content:
            client.sendmail("alice@example.com", ["bob@example.com"],
                            unique_message(marker, 8000))
        assert content.value.smtp_code == 552 and content.value.smtp_error.startswith(b"5.3.4")
    lines = session_lines(small_gateway, lambda found: sum("too big" in l for l in found) >= 2)
    assert any('end="gateway message too big"' in l for l in lines), lines
    assert any('end="gateway declared size too big"' in l for l in lines)


def test_backend_down_is_a_temporary_failure(small_gateway):
    # A sync is a full one: every route again, carol's to the dead back-end.
    small_gateway.route({**{u: "A" for u in USERS_A}, **{u: "B" for u in USERS_B},
                         "carol@example.com": "DOWN"})
    raw = SmtpRaw(small_gateway.submission_port)
    raw.command(b"EHLO client")
    assert raw.command(b"AUTH PLAIN " + plain("carol@example.com", "carol-secret")) == \
        [b"454 4.7.0 Temporary authentication failure, try again later"]
    assert raw.command(b"NOOP") == [b"250 2.0.0 OK"]     # the session goes on
    raw.command(b"QUIT")


def test_auth_before_starttls_is_refused(small_gateway):
    raw = SmtpRaw(small_gateway.starttls_port)
    keywords = [line[4:] for line in raw.command(b"EHLO client")[1:]]
    assert b"STARTTLS" in keywords and not any(k.startswith(b"AUTH") for k in keywords)
    assert raw.command(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret")) == \
        [b"530 5.7.0 Must issue a STARTTLS command first"]
    assert raw.command(b"AUTH LOGIN")[0].startswith(b"530 5.7.0")
    assert raw.command(b"MAIL FROM:<alice@example.com>")[0].startswith(b"530 5.7.0")
    raw.command(b"QUIT")


def test_relay_host_takes_every_login(tmp_path_factory, redis_server, mail_system):
    """[submission] relay: bob is routed to A, whose submission service does not know him;
    the relay (B's) does, so the login works only if the relay is used."""
    dovecot_b = mail_system[1]
    gw = start_gateway(tmp_path_factory, redis_server, mail_system, sections={
        "submission": {"relay": f"{dovecot_b.host}:{dovecot_b.submission_port}"}})
    try:
        gw.route({"bob@example.com": "A"})
        marker = f"relay-{time.time_ns()}"
        with smtp(gw) as client:
            client.login("bob@example.com", "bob-secret")
            client.sendmail("bob@example.com", ["dave@example.com"], unique_message(marker))
        lines = session_lines(gw, lambda found: any("login=bob" in l for l in found))
        assert any("backend=submission-relay" in l for l in lines)
    finally:
        gw.stop()


def test_idle_client_before_auth_gets_421(small_gateway):
    raw = SmtpRaw(small_gateway.submission_port)
    raw.command(b"EHLO client")
    raw.sock.settimeout(30)
    assert raw.line().startswith(b"421 4.4.2 ")
    assert raw.closed()


def test_size_announced_right_behind_auth_is_refused(small_gateway):
    raw = SmtpRaw(small_gateway.submission_port)
    raw.command(b"EHLO client")
    raw.send(b"AUTH PLAIN " + plain("alice@example.com", "alice-secret") + b"\r\n"
             b"MAIL FROM:<alice@example.com> SIZE=999999\r\n")
    assert raw.reply()[0].startswith(b"235 ")
    assert raw.reply() == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
    assert raw.closed()


def test_relay_trusting_xclient_login_gets_no_password(tmp_path_factory, redis_server,
                                                       mail_system):
    """relay_xclient_login: the gateway checks the password at the mailbox's IMAP back-end,
    then vouches for the login to the relay (Postfix, smtpd_authorized_xclient_hosts) with
    XCLIENT LOGIN=; no AUTH and no password reach the relay."""
    mta = mail_system[2]
    gw = start_gateway(tmp_path_factory, redis_server, mail_system, sections={
        "submission": {"relay": f"{mta.host}:{mta.port}", "relay_xclient_login": True}})
    try:
        with smtp(gw) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
                client.login("bob@example.com", "not-bobs")
            assert (wrong.value.smtp_code, wrong.value.smtp_error) == (535, AUTH_FAILED[4:])
        marker = f"xclient-login-{time.time_ns()}"
        with smtp(gw, source_address=("127.0.0.3", 0)) as client:
            client.login("bob@example.com", "bob-secret")
            assert client.sendmail("bob@example.com", ["alice@example.com"],
                                   unique_message(marker)) == {}
        wait_for_message(gw, "alice@example.com", marker)
        vouched = [line for line in mta.log_text().splitlines()
                   if "[127.0.0.3], sasl_method=XCLIENT, sasl_username=bob@example.com" in line]
        assert vouched, mta.log_text()[-2000:]
    finally:
        gw.stop()


def test_kick_closes_a_logged_in_submission_session(gateway):
    raw = SmtpRaw(gateway.submission_port)
    raw.command(b"EHLO client")
    assert raw.command(b"AUTH PLAIN " + plain("dave@example.com", "dave-secret"))[0][:3] == \
        b"235"
    assert raw.command(b"MAIL FROM:<dave@example.com>")[0][:3] == b"250"   # relayed now
    kick = subprocess.run([sys.executable, "-m", "gateway", "kick", "dave@example.com",
                           "--config", str(gateway.config_path)], cwd=servers.REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert kick.returncode == 0, kick.stderr
    assert raw.line().startswith(b"421 4.3.0 ")
    assert raw.closed()


def test_submission_logins_are_in_the_metrics(gateway):
    before = scrape(gateway)
    with smtp(gateway) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("carol@example.com", "wrong")
        client.login("carol@example.com", "carol-secret")
        client.noop()

    def grew(samples, name, **labels):
        return total(samples, name, **labels) - total(before, name, **labels)

    # Workers flush their counts in batches: an earlier test's logins may land after
    # ``before``, so the counts grow by at least these.  smtplib's login() tries PLAIN,
    # then LOGIN: two failed logins.
    def counted():
        now = scrape(gateway)
        return now if grew(now, "mailgate_logins_total", protocol="submission",
                           result="ok") >= 1 and \
            grew(now, "mailgate_logins_total", protocol="submission",
                 result="auth-failed") >= 2 else None

    samples = wait_until(counted)
    assert samples is not None, scrape_text(gateway)
    assert grew(samples, "mailgate_connections_total", protocol="submission") >= 1
