"""Pure pieces of the directory: login normalization, the msgpack record, key names."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, strategies as st

from gateway.directory import records
from gateway.directory.records import MailboxRecord, normalize_login


@pytest.mark.parametrize("login, default_domain, expected", [
    ("alice@example.com", "", "alice@example.com"),
    ("  Alice@Example.COM \t", "", "alice@example.com"),
    ("alice", "", "alice"),
    ("alice", "example.com", "alice@example.com"),
    ("Alice", "Example.COM", "alice@example.com"),
    ("alice@other.org", "example.com", "alice@other.org"),
    ("CORP\\Alice", "example.com", "corp\\alice"),
    ("CORP\\Alice", "", "corp\\alice"),
    ("Jürgen@Exämple.de", "", "jürgen@exämple.de"),
])
def test_normalize_login(login, default_domain, expected):
    assert normalize_login(login, default_domain) == expected


@pytest.mark.parametrize("login, default_domain", [
    ("", ""),
    ("   ", "example.com"),
    ("ali\x00ce", ""),
    ("alice", "exam\nple.com"),
    ("ali\rce", ""),
    ("ali\x7fce", ""),
    ("ali\x85ce", ""),
    ("a" * 256, ""),
    ("a" * 250, "example.com"),   # too long only once the default domain is appended
])
def test_normalize_login_rejects(login, default_domain):
    with pytest.raises(ValueError):
        normalize_login(login, default_domain)


def test_normalize_login_accepts_255_characters():
    assert normalize_login("A" * 255) == "a" * 255


@given(st.text(max_size=300), st.sampled_from(["", "example.com"]))
def test_normalize_login_is_idempotent(login, default_domain):
    try:
        once = normalize_login(login, default_domain)
    except ValueError:
        return
    assert normalize_login(once, default_domain) == once


@pytest.mark.parametrize("record", [
    MailboxRecord("A"),
    MailboxRecord("A", "alice.store", "uuid-1", "export", 7),
    MailboxRecord("B", backend_login="CORP\\alice"),
    MailboxRecord("Bäckend", "ü", "", "ldap"),
])
def test_pack_unpack_round_trip(record):
    assert MailboxRecord.unpack(record.pack()) == record


@given(st.text(min_size=1), st.text(), st.text(), st.text(), st.integers(0, 2**63 - 1))
def test_pack_unpack_round_trip_any_strings(backend, backend_login, mailbox_id, source, gen):
    record = MailboxRecord(backend, backend_login, mailbox_id, source, gen)
    assert MailboxRecord.unpack(record.pack()) == record


def test_pack_is_compact_and_leaves_empty_fields_out():
    assert msgpack.unpackb(MailboxRecord("A").pack()) == {"b": "A"}
    assert msgpack.unpackb(MailboxRecord("A", "x", "i", "s", 3).pack()) == \
        {"b": "A", "l": "x", "i": "i", "s": "s", "g": 3}


def test_pack_record_matches_dataclass_pack():
    assert records.pack_record("A", "x", "", "export") == \
        MailboxRecord("A", "x", "", "export").pack()


def test_unpack_generation_override():
    data = MailboxRecord("A", generation=3).pack()
    assert MailboxRecord.unpack(data, generation=9).generation == 9


def test_unpack_ignores_unknown_keys():
    data = msgpack.packb({"b": "A", "l": "x", "future": [1, 2]})
    assert MailboxRecord.unpack(data) == MailboxRecord("A", "x")


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",                                    # never used in msgpack
    msgpack.packb([1, 2]),
    msgpack.packb({"l": "x"}),                 # no back-end
    msgpack.packb({"b": ""}),
    msgpack.packb({"b": 5}),
    msgpack.packb({"b": "A", "l": 5}),
    msgpack.packb({"b": "A", "g": -1}),
    msgpack.packb({"b": "A", "g": True}),
    msgpack.packb({"b": "A", "g": "7"}),
    msgpack.packb({"b": b"A"}),
    msgpack.packb({"b": "A"}) + b"\x00",        # trailing bytes
    msgpack.packb({1: "A"}),
    b"\x81\xa1b\xa2\xff\xfe",                   # not UTF-8
    b"\x91" * 100000,                           # nesting bomb
])
def test_unpack_garbage_raises_value_error(data):
    with pytest.raises(ValueError):
        MailboxRecord.unpack(data)


@given(st.binary(max_size=200))
def test_unpack_arbitrary_bytes_raises_only_value_error(data):
    try:
        record = MailboxRecord.unpack(data)
    except ValueError:
        return
    assert isinstance(record, MailboxRecord) and record.backend


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=3) | st.integers(-2**63, 2**64 - 1), children, max_size=4),
    max_leaves=12))
def test_unpack_arbitrary_msgpack_raises_only_value_error(value):
    data = msgpack.packb(value)
    try:
        record = MailboxRecord.unpack(data)
    except ValueError:
        return
    assert isinstance(record.backend, str) and record.backend


def test_key_names():
    assert records.CURRENT_KEY == "mailgate:dir:current"
    assert records.generation_key(7) == "mailgate:dir:gen:7"
    assert records.generation_key(b"7") == "mailgate:dir:gen:7"
    assert records.negative_key("alice@example.com") == "mailgate:dir:neg:alice@example.com"
    assert records.MOVES_CHANNEL == "mailgate:moves"
    assert records.KICK_CHANNEL == "mailgate:kick"
    assert records.mailbox_ids_key(7) == "mailgate:dir:ids:7"
    assert records.LDAP_MARK_KEY == "mailgate:dir:ldap"
    assert records.LOOKUP_SCRIPT.count("redis.call") == 3   # GET, HGET, EXISTS on a miss only


def test_move_message_round_trip():
    data = records.move_message("alice@example.com", "A", "B")
    assert msgpack.unpackb(data) == {"login": "alice@example.com", "from": "A", "to": "B"}
    assert records.parse_move_message(data) == ("alice@example.com", "A", "B", "")
    with_id = records.move_message("alice@example.com", "A", "B", "id-1")
    assert records.parse_move_message(with_id).mailbox_id == "id-1"
    assert records.parse_close_message(with_id) == ("alice@example.com", "id-1")
    with pytest.raises(ValueError):
        records.parse_move_message(b"\x93")
    with pytest.raises(ValueError):
        records.parse_move_message(msgpack.packb({"login": "a", "from": "A"}))


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"login": ""}),
    msgpack.packb({"login": 5}), msgpack.packb({"login": "a", "id": 5}),
    msgpack.packb({"id": "x"}),
])
def test_close_message_garbage_raises_value_error(data):
    with pytest.raises(ValueError):
        records.parse_close_message(data)


def test_kick_message():
    assert records.parse_close_message(records.kick_message("bob@example.com")) == \
        ("bob@example.com", "")
    assert records.parse_close_message(records.kick_message("bob", "id-b")) == ("bob", "id-b")
