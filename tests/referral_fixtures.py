"""Fixtures for RFC 2193 mailbox referrals: two real Dovecots and the scripted back-end.

A test module takes them with ``from referral_fixtures import *``:

* ``ref_home``: Dovecot "ref-home" holding each REF_USERS user's own mailboxes, with one
  message in INBOX (Subject "home inbox").
* ``ref_remote``: Dovecot "ref-remote", the same users and passwords, where the public
  folders "public/NAME" (NAME in PUBLIC_FOLDERS) exist for every user, each holding one
  message (Subject "public NAME").
* ``ref_archive``: Dovecot "ref-archive", a second remote server offering only a few
  capabilities (ARCHIVE_CAPABILITIES: no MOVE, UIDPLUS, UNSELECT), where each user has the
  folder "old" (one message, Subject "archive old"); referral back-ends made with
  ``archive=ref_archive`` refer "archive/old" to it (a referral that renames).
* ``archive_home`` / ``archive_gateway``: one scripted home that also refers "archive/old",
  and a started gateway in front of it (module scope: a gateway per test would use up the
  test Redis's databases); ``routed_gateway(...)`` builds more.
* ``referral_backend``: a started :class:`ReferralBackend` in front of ``ref_home`` that
  refers "public/..." to ``ref_remote``.
* ``make_referral_backend(**kwargs)``: more of them (function scope, stopped at teardown),
  e.g. ``referral_host="192.0.2.1"`` for a referral the gateway must refuse.

Both Dovecots use "/" as the hierarchy separator (SLASH_NAMESPACE), so mailbox names look
the same on every server; Maildir++ still stores "public/news" as ".public.news".
"""
from __future__ import annotations

import os

import pytest

import servers
from referral_backend import ReferralBackend

__all__ = ["SLASH_NAMESPACE", "REF_USER", "REF_PASSWORD", "REF_USERS", "PUBLIC_FOLDERS",
           "ARCHIVE_CAPABILITIES", "ARCHIVE_FOLDER",
           "ref_home", "ref_remote", "ref_archive", "referral_backend", "make_referral_backend",
           "archive_home", "archive_gateway", "routed_gateway"]

SLASH_NAMESPACE = "namespace inbox {\n  inbox = yes\n  separator = /\n}\n"
REF_USER = "ref@example.com"
REF_PASSWORD = "ref-secret"
REF_USERS = {
    REF_USER: REF_PASSWORD,
    # A password LOGIN cannot carry as an atom: exercises literal replay on every hop.
    "refweird@example.com": 'p a"s\\s{5}wörd',
}
PUBLIC_FOLDERS = ("news", "announcements")
ARCHIVE_CAPABILITIES = "IMAP4rev1 LITERAL+ IDLE ID NAMESPACE"
ARCHIVE_FOLDER = "archive/old"    # the client's name; "old" on ref_archive


def _message(subject: str) -> bytes:
    return (f"From: sender@example.com\r\nTo: ref@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\n"
            f"Body of {subject}.\r\n").encode()


def _require_dovecot() -> None:
    if servers.find_binary("dovecot") is not None:
        return
    message = "dovecot is not installed (apt-get install dovecot-imapd dovecot-pop3d)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message}; CI must run the integration tests", pytrace=False)
    pytest.skip(message)


def _start_dovecot(tmp_path_factory, name: str, extra_conf: str = "") -> servers.Dovecot:
    _require_dovecot()
    server = servers.Dovecot(tmp_path_factory.mktemp(name), name, REF_USERS,
                             extra_conf=SLASH_NAMESPACE + extra_conf)
    server.start()
    return server


@pytest.fixture(scope="module")
def ref_home(tmp_path_factory):
    """The users' home server (a real Dovecot; "/" separator; one INBOX message each)."""
    server = _start_dovecot(tmp_path_factory, "ref-home")
    try:
        for user in REF_USERS:
            server.deliver(user, _message("home inbox"))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ref_remote(tmp_path_factory):
    """The public-folder server (a real Dovecot): "public/NAME" for every user, one message
    in each."""
    server = _start_dovecot(tmp_path_factory, "ref-remote")
    try:
        for user in REF_USERS:
            client = server.imap(user)
            try:
                for name in PUBLIC_FOLDERS:
                    typ, data = client.create(f"public/{name}")
                    assert typ == "OK", data
            finally:
                client.logout()
            for name in PUBLIC_FOLDERS:
                server.deliver(user, _message(f"public {name}"), folder=f"public/{name}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ref_archive(tmp_path_factory):
    """A second remote server with few capabilities; "old" holds one message per user."""
    server = _start_dovecot(tmp_path_factory, "ref-archive",
                            f"imap_capability = {ARCHIVE_CAPABILITIES}\n")
    try:
        for user in REF_USERS:
            client = server.imap(user)
            try:
                typ, data = client.create("old")
                assert typ == "OK", data
            finally:
                client.logout()
            server.deliver(user, _message("archive old"), folder="old")
        yield server
    finally:
        server.stop()


def _backend(ref_home, ref_remote, archive=None, **kwargs) -> ReferralBackend:
    if archive is not None:
        kwargs["elsewhere"] = {ARCHIVE_FOLDER: (archive.host, archive.imap_port, "old")}
    kwargs.setdefault("remote_host", ref_remote.host)
    kwargs.setdefault("remote_port", ref_remote.imap_port)
    kwargs.setdefault("public_folders", list(PUBLIC_FOLDERS))
    return ReferralBackend(ref_home, **kwargs)


@pytest.fixture(scope="module")
def referral_backend(ref_home, ref_remote):
    """The scripted referral server in front of ref_home, referring public/ to ref_remote."""
    backend = _backend(ref_home, ref_remote).start()
    try:
        yield backend
    finally:
        backend.stop()


@pytest.fixture
def make_referral_backend(ref_home, ref_remote):
    """Factory: ``make_referral_backend(**ReferralBackend kwargs)`` → a started back-end in
    front of ref_home (remote and public folders default to ref_remote's)."""
    made: list[ReferralBackend] = []

    def make(**kwargs) -> ReferralBackend:
        backend = _backend(ref_home, ref_remote, **kwargs)
        made.append(backend)
        return backend.start()

    yield make
    for backend in made:
        backend.stop()


def routed_gateway(tmp_path_factory, redis_server, home: ReferralBackend, remote, archive,
                   sections: dict | None = None) -> servers.GatewayProcess:
    """A started gateway routing REF_USERS to ``home``, with ``remote`` (PUBLIC) and
    ``archive`` (ARCHIVE) as back-ends it may follow referrals to; the caller stops it."""
    gateway = servers.GatewayProcess(
        tmp_path_factory.mktemp("routed-gateway"), redis_url=redis_server.allocate_db(),
        backends={"HOME": (home.host, home.port, home.port),
                  "PUBLIC": (remote.host, remote.imap_port, remote.pop3_port),
                  "ARCHIVE": (archive.host, archive.imap_port, archive.pop3_port)},
        sections=sections)
    try:
        gateway.start()
        gateway.route({user: "HOME" for user in REF_USERS})
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.fixture(scope="module")
def archive_home(ref_home, ref_remote, ref_archive):
    """A scripted home that refers public/ to ref_remote and "archive/old" to ref_archive."""
    backend = _backend(ref_home, ref_remote, archive=ref_archive).start()
    try:
        yield backend
    finally:
        backend.stop()


@pytest.fixture(scope="module")
def archive_gateway(tmp_path_factory, redis_server, archive_home, ref_remote, ref_archive):
    gateway = routed_gateway(tmp_path_factory, redis_server, archive_home, ref_remote,
                             ref_archive)
    try:
        yield gateway
    finally:
        gateway.stop()
