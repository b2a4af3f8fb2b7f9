"""Self-test of the scripted RFC 2193 referral back-end (tests/referral_backend.py), used
directly with imaplib and raw sockets, no gateway: what it refers, what it relays verbatim
to the real Dovecot behind it, and that it stops cleanly."""

from __future__ import annotations

import imaplib
import socket
import threading
import time

import pytest

from gateway.imap.parser import Framer, Line, parse_response
from gateway.imap.urls import parse_referral
from referral_fixtures import *  # noqa: F403 - the fixtures
from referral_fixtures import PUBLIC_FOLDERS, REF_PASSWORD, REF_USER, REF_USERS

# imaplib only sends commands it knows; RLIST / RLSUB are RFC 2193's.
imaplib.Commands.setdefault("RLIST", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("RLSUB", ("AUTH", "SELECTED"))


def connect(backend, user: str = REF_USER) -> imaplib.IMAP4:
    client = imaplib.IMAP4(backend.host, backend.port, timeout=10)
    password = REF_USERS[user]
    if password.isascii():
        client.login(user, password)
    else:   # imaplib's LOGIN only sends ASCII
        secret = b"\0" + user.encode() + b"\0" + password.encode()
        client.authenticate("PLAIN", lambda _challenge: secret)
    return client


def listing(client: imaplib.IMAP4, verb: str, pattern: str = "*") -> tuple[str, set[str]]:
    """(status, {mailbox names}) of LIST / LSUB / RLIST / RLSUB "" pattern."""
    typ, _ = client._simple_command(verb, '""', f'"{pattern}"')
    kind = "LSUB" if verb.endswith("LSUB") else "LIST"
    lines = client.untagged_responses.pop(kind, [])
    names = {parse_response([b"* " + kind.encode() + b" " + line + b"\r\n"]).args[2]
             for line in lines if line is not None}
    return typ, {n.decode() if isinstance(n, bytes) else str(n) for n in names}


def referral_of(typ: str, data: list) -> list:
    """The URLs of a NO [REFERRAL ...] answer imaplib returned."""
    assert typ == "NO", (typ, data)
    response = parse_response([b"t NO " + data[-1] + b"\r\n"])
    assert response.code is not None and response.code.name == "REFERRAL", data
    return parse_referral(response.code.text)


class RawClient:
    """A line-level IMAP client over a plain socket, every read bounded by a timeout."""

    def __init__(self, backend):
        self.sock = socket.create_connection((backend.host, backend.port), timeout=10)
        self.framer = Framer()
        self.lines: list[bytes] = []
        self.greeting = self.read_line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while not self.lines:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.lines += [e.data for e in self.framer.feed(data) if isinstance(e, Line)]
        return self.lines.pop(0)

    def until_tagged(self, tag: bytes) -> list[bytes]:
        got = []
        while True:
            line = self.read_line()
            got.append(line)
            if line.startswith(tag + b" "):
                return got

    def login(self) -> None:
        self.send(b"L LOGIN %s %s\r\n" % (REF_USER.encode(), REF_PASSWORD.encode()))
        assert self.until_tagged(b"L")[-1].startswith(b"L OK")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(referral_backend):
    imap = connect(referral_backend)
    yield imap
    try:
        imap.logout()
    except (imaplib.IMAP4.error, OSError):
        pass


@pytest.fixture
def raw(referral_backend):
    made = []

    def make(backend=referral_backend) -> RawClient:
        made.append(RawClient(backend))
        return made[-1]

    yield make
    for conn in made:
        conn.close()


# ----------------------------------------------------------------------- login and lists

def test_greeting_and_capabilities(raw, client):
    assert raw().greeting == (b"* OK [CAPABILITY IMAP4rev1 LITERAL+ MAILBOX-REFERRALS ID IDLE "
                              b"UIDPLUS UNSELECT] scripted referral server ready\r\n")
    typ, data = client.capability()
    assert typ == "OK"
    assert data[0].split() == (b"IMAP4rev1 LITERAL+ MAILBOX-REFERRALS ID IDLE UIDPLUS "
                               b"UNSELECT NAMESPACE MOVE LIST-EXTENDED LIST-STATUS").split()


def test_login_answer_carries_the_scripted_capabilities(raw):
    conn = raw()
    conn.send(b"a ID NIL\r\n")
    assert conn.until_tagged(b"a") == [b"* ID NIL\r\n", b"a OK ID completed\r\n"]
    # Synchronizing literals: the back-end answers "+" itself, then replays the login.
    conn.send(b"b LOGIN {%d}\r\n" % len(REF_USER))
    assert conn.read_line().startswith(b"+ ")
    conn.send(REF_USER.encode() + b" {%d}\r\n" % len(REF_PASSWORD))
    assert conn.read_line().startswith(b"+ ")
    conn.send(REF_PASSWORD.encode() + b"\r\n")
    assert conn.until_tagged(b"b") == [
        (b"b OK [CAPABILITY IMAP4rev1 LITERAL+ MAILBOX-REFERRALS ID IDLE UIDPLUS UNSELECT "
         b"NAMESPACE MOVE LIST-EXTENDED LIST-STATUS] Logged in\r\n")]


def test_wrong_password_gets_dovecots_answer(referral_backend):
    imap = imaplib.IMAP4(referral_backend.host, referral_backend.port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(REF_USER, "wrong")
        imap.login(REF_USER, REF_PASSWORD)   # the session is still usable
    finally:
        imap.logout()


def test_authenticate_plain_with_a_password_full_of_specials(referral_backend):
    imap = connect(referral_backend, "refweird@example.com")
    try:
        typ, data = imap.select("public/news")
        assert referral_of(typ, data)[0].user == "refweird@example.com"
    finally:
        imap.logout()


def test_commands_before_login(raw):
    conn = raw()
    conn.send(b"a SELECT INBOX\r\nb CAPABILITY\r\n")
    assert conn.until_tagged(b"a") == [b"a BAD Log in first\r\n"]
    caps = conn.until_tagged(b"b")
    assert b"AUTH=PLAIN" in caps[0] and caps[-1].startswith(b"b OK")


def test_rlist_shows_home_and_public_folders(client):
    typ, names = listing(client, "RLIST")
    assert typ == "OK"
    assert names == {"INBOX", "public"} | {f"public/{n}" for n in PUBLIC_FOLDERS}
    typ, names = listing(client, "RLIST", "public/%")
    assert names == {f"public/{n}" for n in PUBLIC_FOLDERS}
    typ, names = listing(client, "RLIST", "%")
    assert names == {"INBOX", "public"}


def test_rlist_lines_as_specified(referral_backend, raw):
    conn = raw()
    conn.login()
    conn.send(b'r RLIST "" "public/news"\r\n')
    assert conn.until_tagged(b"r")[:-1] == [b'* LIST () "/" "public/news"\r\n']


def test_list_shows_home_folders_only(client):
    typ, names = listing(client, "LIST")
    assert typ == "OK" and names == {"INBOX"}   # RFC 2193 §6: no remote mailboxes


def test_rlsub_adds_public_folders_to_subscriptions(client):
    assert client.subscribe("INBOX")[0] == "OK"
    typ, names = listing(client, "RLSUB")
    assert typ == "OK" and names == {"INBOX"} | {f"public/{n}" for n in PUBLIC_FOLDERS}
    typ, names = listing(client, "LSUB")
    assert names == {"INBOX"}


# ------------------------------------------------------------------------------ referrals

def test_select_public_folder_refers_to_the_remote_dovecot(client, ref_remote):
    urls = referral_of(*client.select("public/news"))
    assert len(urls) == 1
    url = urls[0]
    assert (url.host, url.port) == (ref_remote.host, ref_remote.imap_port)
    assert (url.user, url.auth, url.mailbox) == (REF_USER, "*", "public/news")


@pytest.mark.parametrize("command,args", [
    ("EXAMINE", ("public/news",)),
    ("STATUS", ("public/news", "(MESSAGES)")),
    ("CREATE", ("public/new-one",)),
    ("DELETE", ("public/announcements",)),
    ("SUBSCRIBE", ("public/news",)),
    ("UNSUBSCRIBE", ("public/news",)),
])
def test_mailbox_commands_on_public_folders_refer(client, command, args):
    typ, data = client._simple_command(command, *args)
    url, = referral_of(typ, data)
    assert url.mailbox == args[0]


def test_rename_involving_a_public_folder_refers_both_names(client):
    urls = referral_of(*client.rename("INBOX/old", "public/news"))
    assert [u.mailbox for u in urls] == ["INBOX/old", "public/news"]


@pytest.mark.parametrize("command", ["COPY", "MOVE", "UID COPY", "UID MOVE"])
def test_copy_or_move_into_a_public_folder_refers(client, command):
    assert client.select("INBOX")[0] == "OK"
    if command.startswith("UID"):
        typ, data = client.uid(command.split()[1], "1", "public/news")
    else:
        typ, data = client._simple_command(command, "1", "public/news")
    assert referral_of(typ, data)[0].mailbox == "public/news"
    assert client.select("INBOX")[1] == [b"1"]   # nothing moved away


def test_append_to_public_folder_refers_instead_of_asking_for_the_message(client):
    typ, data = client.append("public/news", None, None, b"Subject: x\r\n\r\nbody\r\n")
    assert referral_of(typ, data)[0].mailbox == "public/news"
    assert client.noop()[0] == "OK"


def test_append_with_literal_plus_to_public_folder_is_discarded_then_referred(raw):
    conn = raw()
    conn.login()
    message = b"Subject: y\r\n\r\nA message that must be read and thrown away.\r\n"
    conn.send(b"a APPEND public/news (\\Seen) {%d+}\r\n%s\r\nb NOOP\r\n"
              % (len(message), message))
    answer = conn.until_tagged(b"a")
    assert answer[-1].startswith(b"a NO [REFERRAL imap://")
    assert conn.until_tagged(b"b")[-1].startswith(b"b OK")


def test_append_with_the_mailbox_as_a_literal(raw):
    conn = raw()
    conn.login()
    conn.send(b"a APPEND {11}\r\n")
    assert conn.read_line().startswith(b"+ ")
    conn.send(b"public/news {4}\r\n")
    assert conn.until_tagged(b"a")[-1].startswith(b"a NO [REFERRAL imap://")
    conn.send(b"b NOOP\r\n")   # the refused payload was never sent: still in step
    assert conn.until_tagged(b"b")[-1].startswith(b"b OK")


def test_non_ascii_public_folder_url_is_utf8(client):
    urls = referral_of(*client.select("public/&AOQ-pfel"))
    assert urls[0].mailbox == "public/äpfel"


def test_referral_host_and_port_can_be_overridden(make_referral_backend):
    backend = make_referral_backend(referral_host="192.0.2.1", referral_port=1993)
    imap = connect(backend)
    try:
        url, = referral_of(*imap.select("public/news"))
        assert (url.host, url.port) == ("192.0.2.1", 1993)
    finally:
        imap.logout()


def test_nested_public_folders_list_their_parents(make_referral_backend):
    backend = make_referral_backend(public_folders=["sales/emea", "sales/apac"])
    imap = connect(backend)
    try:
        assert listing(imap, "RLIST", "%")[1] == {"INBOX", "public"}
        assert listing(imap, "RLIST", "public/%")[1] == {"public/sales"}
        assert listing(imap, "RLIST", "public/sales/%")[1] == {"public/sales/emea",
                                                               "public/sales/apac"}
        assert listing(imap, "RLIST", "*")[1] == {"INBOX", "public", "public/sales",
                                                  "public/sales/emea", "public/sales/apac"}
    finally:
        imap.logout()


# ----------------------------------------------------------------------- verbatim relay

def test_select_inbox_and_fetch_are_relayed(client):
    typ, data = client.select("INBOX")
    assert (typ, data) == ("OK", [b"1"])
    typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK" and b"Subject: home inbox" in data[0][1]
    typ, data = client.search(None, "ALL")
    assert data == [b"1"]


def test_append_and_create_at_home_are_relayed(client, ref_home):
    assert client.create("INBOX/archive")[0] == "OK"
    message = b"Subject: appended\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    assert client.append("INBOX/archive", None, None, message)[0] == "OK"
    direct = ref_home.imap(REF_USER)
    try:
        typ, data = direct.select("INBOX/archive")
        assert (typ, data) == ("OK", [b"1"])
        typ, data = direct.fetch("1", "(RFC822)")
        assert data[0][1].replace(b"\r\n", b"\n") == message.replace(b"\r\n", b"\n")
    finally:
        direct.logout()
    assert client.delete("INBOX/archive")[0] == "OK"


def test_idle_and_done_are_relayed(raw, ref_home):
    conn = raw()
    conn.login()
    conn.send(b"s SELECT INBOX\r\n")
    conn.until_tagged(b"s")
    conn.send(b"i IDLE\r\n")
    assert conn.read_line().startswith(b"+ ")
    ref_home.deliver(REF_USER, b"Subject: while idling\r\n\r\nhi\r\n")
    deadline = time.monotonic() + 10
    while conn.read_line() != b"* 2 EXISTS\r\n":
        assert time.monotonic() < deadline
    conn.send(b"DONE\r\n")
    assert conn.until_tagged(b"i")[-1].startswith(b"i OK")


def test_pipelined_commands_are_answered_in_order(raw):
    conn = raw()
    conn.login()
    conn.send(b"a SELECT INBOX\r\nb SELECT public/news\r\nc NOOP\r\nd ID NIL\r\n")
    tagged = [line.split(b" ", 2)[:2] for line in conn.until_tagged(b"d")
              if not line.startswith((b"*", b"+"))]
    assert tagged == [[b"a", b"OK"], [b"b", b"NO"], [b"c", b"OK"], [b"d", b"OK"]]


def test_commands_are_recorded(make_referral_backend):
    backend = make_referral_backend()
    imap = connect(backend)
    try:
        listing(imap, "RLIST")
        imap.select("INBOX")
    finally:
        imap.logout()
    verbs = [line.split()[1] for line in backend.commands]
    assert verbs == [b"CAPABILITY", b"LOGIN", b"RLIST", b"SELECT", b"LOGOUT"]
    assert all(line.endswith(b"\r\n") for line in backend.commands)


def test_logout_closes_the_connection(raw):
    conn = raw()
    conn.login()
    conn.send(b"z LOGOUT\r\n")
    assert conn.until_tagged(b"z")[-1].startswith(b"z OK")
    with pytest.raises(EOFError):
        conn.read_line()


def test_stop_closes_sessions_and_threads(make_referral_backend):
    before = set(threading.enumerate())
    backend = make_referral_backend()
    conn = RawClient(backend)
    conn.login()
    backend.stop()
    with pytest.raises((EOFError, ConnectionError)):
        conn.read_line()
    conn.close()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not set(threading.enumerate()) - before
    with pytest.raises(OSError):
        socket.create_connection((backend.host, backend.port), timeout=1).close()
