"""Hypothesis on every parser that reads what someone else wrote, beyond the IMAP framer and
parser (tests/unit/test_imap_parser.py) and IMAP URLs (tests/unit/test_imap_urls.py): the
post-login command tracker, SASL PLAIN, directory exports (CSV and LDIF), the config, the
moves channel's messages.  Each may reject input only with its own error type.
"""
from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as gateway_config
from gateway import sasl
from gateway.config import ConfigError, DirectoryConfig
from gateway.directory import records
from gateway.directory.export import ExportError, iter_csv
from gateway.directory.ldif_export import iter_ldif
from gateway.imap.tracker import CommandTracker

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:])]


# -- the command tracker after login ------------------------------------------------------------

COMMANDISH = st.lists(st.sampled_from([
    b"a1 ", b"LOGOUT", b"logout", b"NOOP", b"APPEND x ", b"{3}\r\n", b"{0}\r\n", b"{5+}\r\n",
    b"~{2}\r\n", b"{99999}\r\n", b"\r\n", b"\n", b"x", b" ", b"\x00", b"\xff", b"abc",
]), max_size=40).map(b"".join)


def tracked(pieces) -> tuple:
    tracker = CommandTracker()
    for piece in pieces:
        buffer = bytearray(piece) + b"junk after the size"   # observe() reads only size bytes
        tracker.observe(buffer, len(piece))
    return tracker.literal_left, tracker.continuing, tracker.logout


@FAST
@given(stream=st.one_of(st.binary(max_size=300), COMMANDISH),
       cuts=st.lists(st.integers(0, 400), max_size=20))
def test_tracker_any_split_same_state(stream, cuts):
    assert tracked(cut(stream, cuts)) == tracked([stream])


def test_tracker_sees_logout_but_not_inside_a_literal():
    assert tracked([b"a1 LOGOUT\r\n"])[2]
    assert not tracked([b"a1 APPEND x {11}\r\n", b"b LOGOUT\r\n"])[2]


# -- SASL PLAIN -------------------------------------------------------------------------------

@FAST
@given(st.binary(max_size=200))
def test_sasl_plain_decode_never_raises(response):
    decoded = sasl.decode_plain(response)
    assert decoded is None or (len(decoded) == 3 and decoded[1])


@FAST
@given(st.text(min_size=1).filter(lambda t: "\0" not in t),
       st.text().filter(lambda t: "\0" not in t))
def test_sasl_plain_round_trip(login, password):
    assert sasl.decode_plain(sasl.encode_plain(login, password)) == ("", login, password)


# -- directory exports ------------------------------------------------------------------------

CSVISH = st.lists(st.sampled_from([
    b"login,backend\n", b"login,backend,backend_login,mailbox_id\n", b"alice@example.com,A\n",
    b"bob,B,b,id1\n", b'"quoted, login",A\n', b",\n", b"\n", b"\r\n", b'"', b",", b"x",
    b"\xff\xfe", b"\x00", b"@", b"a" * 300, b"login\n",
]), max_size=30).map(b"".join)
LDIFISH = st.lists(st.sampled_from([
    b"dn: uid=a,ou=people,dc=example,dc=com\n", b"uid: alice\n", b"mail: a@example.com\n",
    b"mailHost: A\n", b"mailHost:: QQ==\n", b"uid:: !!!\n", b"objectClass: x\n", b"\n",
    b" folded\n", b"# comment\n", b"version: 1\n", b"changetype: delete\n", b"-\n",
    b"mail:< file:///etc/passwd\n", b"\xff", b"\x00", b":", b"dn:", b"x",
]), max_size=30).map(b"".join)


def _read_all(reader, data: bytes, suffix: str) -> None:
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        for entry in reader(path):
            assert entry.login and entry.backend
    except ExportError:
        pass
    finally:
        os.unlink(path)


@FAST
@given(st.one_of(st.binary(max_size=400), CSVISH))
def test_csv_export_rejects_only_with_export_error(data):
    _read_all(lambda path: iter_csv(path, default_domain="example.com"), data, ".csv")


@FAST
@given(st.one_of(st.binary(max_size=400), LDIFISH))
def test_ldif_export_rejects_only_with_export_error(data):
    directory = DirectoryConfig(login_attributes=("uid", "mail"), backend_attribute="mailHost",
                                default_domain="example.com")
    _read_all(lambda path: iter_ldif(path, directory), data, ".ldif")


# -- the config -------------------------------------------------------------------------------

SECTIONS = ["server", "listen", "tls", "redis", "imap", "pop3", "backends", "directory",
            "referrals", "bogus"]
KEYS = ["workers", "max_connections", "heartbeat_timeout", "address", "protocol", "tls",
        "url", "timeout", "preauth_timeout", "max_line", "source", "miss", "ldap_url",
        "imap_port", "login_attributes", "follow", "max_hops", "A", "bogus"]
VALUES = st.recursive(
    st.one_of(st.integers(-10, 10**7), st.floats(allow_nan=True), st.booleans(),
              st.text(max_size=20), st.sampled_from(["127.0.0.1:1143", "imap", "ldap", "none"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=10)


@FAST
@given(st.dictionaries(st.sampled_from(SECTIONS), VALUES, max_size=6))
def test_config_rejects_only_with_config_error(raw):
    try:
        gateway_config.parse(raw, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")


# -- the moves channel --------------------------------------------------------------------------

@FAST
@given(st.binary(max_size=200))
def test_close_messages_reject_only_with_value_error(data):
    for parse in (records.parse_close_message, records.parse_move_message):
        try:
            parse(data)
        except ValueError:
            pass
