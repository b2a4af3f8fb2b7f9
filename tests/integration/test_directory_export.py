"""The directory cache against a real redis-server: CSV sync, lookups, diffs, moves, failures."""
from __future__ import annotations

import io
import socket
import time

import msgpack
import pytest
import redis

from gateway import config as gateway_config
from gateway.directory import records
from gateway.directory.cache import Directory, DirectoryUnavailable, connect, redis_url
from gateway.directory.cli import cmd_lookup, cmd_sync_export
from gateway.directory.export import ExportEntry, ExportError, iter_csv
from gateway.directory.records import MailboxRecord
from gateway.directory.sync import SyncBusy, full_sync
from helpers import hammer_lookups, run_dir

pytestmark = pytest.mark.integration

BACKENDS = {
    "A": {"address": "10.0.0.1", "imap_port": 1143, "pop3_port": 1110},
    "B": {"address": "store-b.example.net", "imap_port": 2143, "pop3_port": 2110},
}


RUN_DIR = run_dir()


def make_config(url: str, *, default_domain: str = "", timeout: float = 5.0):
    return gateway_config.parse({
        "listen": [{"protocol": "imap", "address": "127.0.0.1:10143"}],
        "redis": {"url": url, "timeout": timeout},
        "backends": BACKENDS,
        "directory": {"source": "export", "default_domain": default_domain},
        # (syncs remember themselves in run_dir: not in the checkout)
        "server": {"run_dir": RUN_DIR},
    }, "test.toml")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def db_url(redis_server):
    return redis_server.allocate_db()


@pytest.fixture
def client(db_url):
    client = redis.Redis.from_url(db_url, socket_timeout=5)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def cfg(db_url, client):
    return make_config(db_url, default_domain="example.com")


@pytest.fixture
def directory(cfg):
    redis_client = connect(cfg)
    yield Directory(redis_client, cfg.directory)
    redis_client.close()


@pytest.fixture
def write_csv(tmp_path):
    count = iter(range(1000))

    def write(text: str, name: str = "") -> str:
        path = tmp_path / (name or f"export-{next(count)}.csv")
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


def sync(cfg, path: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = cmd_sync_export(cfg, path, out=out)
    return status, out.getvalue().splitlines()


def generation_keys(client) -> list[bytes]:
    return sorted(client.scan_iter(match=records.GENERATION_KEY_PREFIX + "*"))


FIRST = """\ufefflogin,backend,backend_login,mailbox_id,display name
alice@example.com,A,,id-alice,Alice
Alice.Smith@Example.com,A,,id-alice,Alice
CORP\\alice,a,,id-alice,Alice
bob,store-b.example.net,bob.b,id-bob,Bob
carol@example.com,B,,id-carol,Carol
dave@example.com,A,,id-dave,Dave
"""

SECOND = """LOGIN,Display Name,BACKEND,Backend_Login
alice@example.com,Alice,B,
Alice.Smith@Example.com,Alice,B,
corp\\alice,Alice,b,
carol@example.com,Carol,B,carol.new
dave@example.com,Dave,A,
erin@example.com,Erin,A,
"""


def test_warm_up_then_lookup_hit_miss_and_default_domain(cfg, directory, write_csv, client):
    status, lines = sync(cfg, write_csv(FIRST))
    assert status == 0
    assert lines == ["sync export: 6 mailboxes, 6 added, 0 changed, 0 removed, 0 skipped, "
                     f"generation 1, {lines[-1].rsplit(', ', 1)[1]}"]
    alice = directory.lookup("ALICE@example.com ")
    assert alice == MailboxRecord("A", "", "id-alice", "export", 1)
    assert directory.lookup("alice") == alice                     # default domain
    assert directory.lookup("nobody@example.com") is None
    assert directory.lookup("nobody") is None
    assert directory.lookup("bad\x00name") is None
    bob = directory.lookup("Bob@Example.com")
    assert (bob.backend, bob.backend_login) == ("B", "bob.b")     # host name → backend name
    assert client.get(records.CURRENT_KEY) == b"1"
    assert client.hget(records.META_KEY, "source") == b"export"
    assert client.hget(records.META_KEY, "total") == b"6"


def test_several_login_names_of_one_mailbox(cfg, directory, write_csv):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    found = {directory.lookup(name) for name in
             ("alice@example.com", "alice.smith@example.com", "corp\\ALICE", "Alice")}
    assert found == {MailboxRecord("A", "", "id-alice", "export", 1)}


def test_lookup_is_one_round_trip(cfg, write_csv):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    sent = []

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command, check_health=True):
            sent.append(command)
            return super().send_packed_command(command, check_health)

    counting = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
        cfg.redis.url, connection_class=CountingConnection))
    try:
        directory = Directory(counting, cfg.directory)
        directory.lookup("alice@example.com")      # connects, loads the script once
        sent.clear()
        assert directory.lookup("bob@example.com").backend == "B"
        assert directory.lookup("nobody@example.com") is None
        assert len(sent) == 2
        assert all(b"EVALSHA" in b"".join(command) for command in sent)
    finally:
        counting.close()


def test_resync_diff_counts_removal_and_published_moves(cfg, directory, write_csv, client):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    pubsub = client.pubsub()
    pubsub.subscribe(records.MOVES_CHANNEL)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    try:
        status, lines = sync(cfg, write_csv(SECOND))
        moves = []
        while (message := pubsub.get_message(timeout=1)) is not None:
            moves.append(msgpack.unpackb(message["data"]))
        # the switch is announced first: workers forget the lookups they keep
        assert moves.pop(0) == {"changed": 2}
    finally:
        pubsub.close()
    assert status == 0
    # added erin; changed: 3 alice names (A→B) and carol (new backend_login);
    # removed: bob; dave unchanged apart from his mailbox_id going away.
    assert lines[-1].startswith("sync export: 6 mailboxes, 1 added, 4 changed, 1 removed, "
                                "0 skipped, generation 2, ")
    assert sorted(moves, key=lambda m: m["login"]) == [
        {"login": "alice.smith@example.com", "from": "A", "to": "B"},
        {"login": "alice@example.com", "from": "A", "to": "B"},
        {"login": "corp\\alice", "from": "A", "to": "B"},
    ]
    assert directory.lookup("bob") is None
    assert directory.lookup("alice").backend == "B"
    assert directory.lookup("carol").backend_login == "carol.new"
    assert directory.lookup("erin") == MailboxRecord("A", source="export", generation=2)
    assert generation_keys(client) == [b"mailgate:dir:gen:2"]
    assert client.ttl(records.generation_key(2)) == -1


def test_many_moves_across_scan_batches(cfg, client, directory):
    logins = [f"user{i}@example.com" for i in range(5000)]
    full_sync(client, (ExportEntry(i, login, "A") for i, login in enumerate(logins)),
              source="export", config=cfg)
    pubsub = client.pubsub()
    pubsub.subscribe(records.MOVES_CHANNEL)
    pubsub.get_message(timeout=5)
    try:
        summary = full_sync(client, (ExportEntry(i, login, "B" if i % 2 else "A")
                                     for i, login in enumerate(logins[:4000])),
                            source="export", config=cfg)
        moved = set()
        while (message := pubsub.get_message(timeout=1)) is not None:
            if records.is_changed_message(message["data"]):
                continue
            login, from_backend, to_backend, _ = records.parse_move_message(message["data"])
            assert (from_backend, to_backend) == ("A", "B")
            moved.add(login)
    finally:
        pubsub.close()
    assert (summary.total, summary.added, summary.changed, summary.removed) == \
        (4000, 0, 2000, 1000)
    assert moved == set(logins[1:4000:2])
    assert directory.lookup("user4999") is None


@pytest.mark.parametrize("text, line, reason", [
    ("login,backend_login\nalice@example.com,x\n", 1, "no 'backend' column"),
    ("\n\nuser,backend\nalice@example.com,A\n", 3, "no 'login' column"),
    ("", 1, "empty file"),
    ("login,backend\nerin@example.com,A\nfrank@example.com,\n", 3, "empty backend"),
    ("login,backend\nerin@example.com,A\n ,A\n", 3, "empty login"),
    ("login,backend\nerin@example.com,A\nfr\x01nk,A\n", 3, "control characters"),
    ("login,backend\nerin@example.com,A\nfrank,A\nErin,B\n", 4,
     "duplicate login 'erin@example.com' (first on line 2)"),
    ('login,backend,note\n"erin@example.com",A,\nfrank,A,"two\nlines"\nerin@example.com,A,\n', 5,
     "(first on line 2)"),
])
def test_malformed_export_names_the_line_and_keeps_the_live_generation(
        cfg, directory, write_csv, client, text, line, reason):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    path = write_csv(text)
    status, lines = sync(cfg, path)
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"sync export: {path}:{line}: ")
    assert reason in lines[0]
    assert client.get(records.CURRENT_KEY) == b"1"
    assert generation_keys(client) == [b"mailgate:dir:gen:1"]
    assert directory.lookup("alice").backend == "A"
    assert directory.lookup("erin") is None


def test_iter_csv_errors_carry_path_and_line(write_csv):
    path = write_csv("login,backend\nalice,A\nbob,\n")
    entries = iter_csv(path, default_domain="example.com")
    assert next(entries) == ExportEntry(2, "alice@example.com", "A", "", "")
    with pytest.raises(ExportError) as caught:
        next(entries)
    assert (caught.value.path, caught.value.line) == (path, 3)
    assert str(caught.value) == f"{path}:3: empty backend"


def test_iter_csv_streams_short_rows_blank_lines_and_extra_columns(write_csv):
    path = write_csv('extra,Login,Backend,Mailbox_ID\r\nx,alice@example.com,A\r\n\r\n'
                     'y,bob@example.com,B,id-b,z\r\n')
    assert list(iter_csv(path)) == [ExportEntry(2, "alice@example.com", "A"),
                                    ExportEntry(4, "bob@example.com", "B", "", "id-b")]


def test_missing_or_undecodable_file(cfg, tmp_path):
    missing = str(tmp_path / "missing.csv")
    status, lines = sync(cfg, missing)
    assert (status, lines) == (1, [f"sync export: {missing}: cannot read: No such file or directory"])
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"login,backend\nalice,A\nj\xfcrgen@example.com,A\n" + b"x,A\n" * 5000)
    status, lines = sync(cfg, str(latin1))
    assert status == 1 and lines == [f"sync export: {latin1}:3: not UTF-8 text"]


def test_unknown_backend_is_skipped_with_its_line(cfg, directory, write_csv):
    status, lines = sync(cfg, write_csv(
        "login,backend\nalice,A\nbob,nowhere.example.net\ncarol,B\n"))
    assert status == 0
    assert lines[0].startswith("sync export: warning: 1 entries name no configured back-end "
                               "('nowhere.example.net') on lines 3")
    assert ", 1 skipped, " in lines[-1] and lines[-1].startswith("sync export: 2 mailboxes")
    assert directory.lookup("bob") is None
    assert directory.lookup("carol").backend == "B"


def test_empty_export_does_not_wipe_the_directory(cfg, directory, write_csv, client):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    status, lines = sync(cfg, write_csv("login,backend\nx,nowhere\n"))
    assert status == 1 and "the live directory (generation 1) was kept" in lines[-1]
    assert directory.lookup("alice").backend == "A"
    assert generation_keys(client) == [b"mailgate:dir:gen:1"]


def test_atomic_swap_never_shows_a_missing_mailbox(cfg, client, directory):
    def entries(tag: str):
        yield ExportEntry(1, "stay@example.com", "A" if tag == "old" else "B")
        for i in range(50_000):
            yield ExportEntry(i + 2, f"{tag}{i}@example.com", "A", "", f"{tag}-{i}")

    full_sync(client, entries("old"), source="export", config=cfg)
    with hammer_lookups(directory, "stay@example.com", "backend") as hammer:
        summary = full_sync(client, entries("new"), source="export", config=cfg)
        during = len(hammer.seen)
        time.sleep(0.05)
    seen, failures = hammer.seen, hammer.failures
    assert failures == []
    assert during > 0 and seen[-1] == "B"
    assert (summary.added, summary.changed, summary.removed) == (50_000, 1, 50_000)


def test_concurrent_sync_is_refused(cfg, client, write_csv):
    client.set(records.SYNC_LOCK_KEY, "someone-else", ex=60)
    with pytest.raises(SyncBusy):
        full_sync(client, iter([ExportEntry(2, "alice@example.com", "A")]),
                  source="export", config=cfg)
    status, lines = sync(cfg, write_csv(FIRST))
    assert status == 2 and "another full sync is running" in lines[0]
    assert client.get(records.CURRENT_KEY) is None


def test_generation_stays_above_the_live_one_after_a_counter_reset(cfg, client, write_csv):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    assert sync(cfg, write_csv(FIRST))[0] == 0
    client.delete(records.NEXT_GENERATION_KEY)
    status, lines = sync(cfg, write_csv(SECOND))
    assert status == 0 and ", generation 3, " in lines[-1]


def test_progress_only_on_a_terminal(cfg, write_csv):
    path = write_csv(FIRST)
    tty = Tty()
    assert cmd_sync_export(cfg, path, out=tty) == 0
    assert "rows/s" in tty.getvalue() and "\r" in tty.getvalue()
    last = tty.getvalue().split("\n")[-2]    # the progress line is erased, then the summary
    assert last.startswith("\r") and last.endswith("\r\x1b[K" + last.rsplit("\x1b[K", 1)[1])
    assert last.rsplit("\x1b[K", 1)[1].startswith("sync export: 6 mailboxes")
    plain = io.StringIO()
    assert cmd_sync_export(cfg, path, out=plain) == 0
    assert "rows/s" not in plain.getvalue()


def test_unparsable_record_is_logged_and_unknown(cfg, directory, write_csv, client, caplog):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    client.hset(records.generation_key(1), "alice@example.com", b"\xc1garbage")
    with caplog.at_level("WARNING", logger="gateway.directory.cache"):
        assert directory.lookup("alice") is None
    assert "alice@example.com" in caplog.text and "unusable" in caplog.text


def test_empty_cache_is_unavailable_not_unknown(directory):
    with pytest.raises(DirectoryUnavailable, match="no sync has completed"):
        directory.lookup("alice")


def test_redis_down_is_unavailable(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = make_config(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    redis_client = connect(cfg)
    with pytest.raises(DirectoryUnavailable):
        Directory(redis_client, cfg.directory).lookup("alice@example.com")
    path = tmp_path / "e.csv"
    path.write_text(FIRST)
    status, lines = sync(cfg, str(path))
    assert status == 2 and lines == [lines[0]]
    assert f"redis://127.0.0.1:{port}/0" in lines[0]
    out = io.StringIO()
    assert cmd_lookup(cfg, "alice", out=out) == 2


def test_redis_silent_times_out_as_unavailable():
    with socket.socket() as silent:        # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = make_config(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout=0.3)
        with pytest.raises(DirectoryUnavailable):
            Directory(connect(cfg), cfg.directory).lookup("alice@example.com")


def test_cmd_lookup_prints_the_location(cfg, write_csv):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    out = io.StringIO()
    assert cmd_lookup(cfg, "Bob", out=out) == 0
    fields = dict(line.split(":", 1) for line in out.getvalue().splitlines())
    fields = {key: value.strip() for key, value in fields.items()}
    assert fields["login"] == "Bob"
    assert fields["normalized"] == "bob@example.com"
    assert fields["backend"] == "B"
    assert fields["address"] == "store-b.example.net:2143 (imap), :2110 (pop3), tls none"
    assert fields["backend_login"] == "bob.b"
    assert fields["mailbox_id"] == "id-bob"
    assert fields["source"] == "export"
    assert fields["generation"] == "1"
    out = io.StringIO()
    assert cmd_lookup(cfg, "nobody", out=out) == 1
    assert "unknown" in out.getvalue()


def test_redis_url_defaults_to_the_embedded_socket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = gateway_config.parse({
        "listen": [{"protocol": "imap", "address": "127.0.0.1:10143"}],
        "server": {"run_dir": "run"}}, "test.toml")
    assert redis_url(cfg) == f"unix://{tmp_path}/run/redis.sock"


# -- LDIF exports ------------------------------------------------------------------------------

LDIF = """\
version: 1

# An ldapsearch -LLL style export, with what RFC 2849 allows: comments (this one is
  folded), folded lines, base64 values (a DN too) and entries that are not mailboxes.
dn: uid=alice,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: alice
mail: alice@example.com
mail: Alice.Smith@Exam
 ple.com
description: an attribute the mapping does not use, folded over
  two lines
jpegPhoto:: not base64 at all, and never decoded
mailHost: A
entryUUID: 11111111-1111-1111-1111-111111111111

dn:: dWlkPWrDvHJnZW4sb3U9cGVvcGxlLGRjPWV4YW1wbGUsZGM9Y29t
objectClass: inetOrgPerson
uid:: asO8cmdlbg==
mail:: SsO8cmdlbi5Nw7xsbGVyQEV4YW1wbGUuY2
 9t
mailHost: store-b.example.net
# a comment inside an entry
entryUUID: 22222222-2222-2222-2222-222222222222

dn: cn=staff,ou=groups,dc=example,dc=com
objectClass: groupOfNames
cn: staff
member: uid=alice,ou=people,dc=example,dc=com

dn: uid=bob,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
uid: bob
mailHost: 10.0.0.1
description:: AAFiaW5hcnkgaWQ=
"""


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_ldif_warm_up_folded_base64_and_comments(cfg, directory, write_csv, newline):
    path = write_csv(LDIF.replace("\n", newline), name=f"export-{len(newline)}.ldif")
    status, lines = sync(cfg, path)
    assert status == 0, lines
    assert lines[-1].startswith("sync export: 5 mailboxes, 5 added, 0 changed, 0 removed, "
                                "0 skipped, generation 1, ")
    alice = directory.lookup("alice")
    assert alice == MailboxRecord("A", "", "11111111-1111-1111-1111-111111111111", "export", 1)
    assert directory.lookup("alice.smith@example.com") == alice          # a folded value
    jurgen = directory.lookup("JÜRGEN.müller@example.com")               # base64, folded
    assert jurgen == directory.lookup("jürgen") and jurgen.backend == "B"
    assert directory.lookup("bob").backend == "A"                        # by address
    assert directory.lookup("staff") is None


def test_ldif_with_the_active_directory_mapping(db_url, client, write_csv):
    cfg = gateway_config.parse({
        "listen": [{"protocol": "imap", "address": "127.0.0.1:10143"}],
        "redis": {"url": db_url}, "backends": {"EXCH01": {"address": "10.0.1.1"}},
        "directory": {"source": "export", "default_domain": "corp.example.com",
                      "netbios_domain": "CORP", "backend_attribute": "msExchHomeServerName",
                      "login_attributes": ["userPrincipalName", "sAMAccountName",
                                           "proxyAddresses"],
                      "id_attribute": "objectGUID"}, "server": {"run_dir": RUN_DIR}}, "test.toml")
    path = write_csv(
        "dn: CN=Jane Doe,OU=Users,DC=corp,DC=example,DC=com\n"
        "sAMAccountName: jdoe\nuserPrincipalName: jane.doe@corp.example.com\n"
        "proxyAddresses: SMTP:Jane.Doe@corp.example.com\nproxyAddresses: smtp:jd@corp.example.com\n"
        "proxyAddresses: X400:c=US;a= ;p=Corp;o=Exchange;s=Doe;\n"
        "objectGUID:: 9/0zL87Tx1KrwmaRiiRqJQ==\n"
        "msExchHomeServerName: /o=Corp/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Con\n"
        " figuration/cn=Servers/cn=EXCH01\n", name="ad.ldif")
    status, lines = sync(cfg, path)
    assert status == 0, lines
    directory = Directory(connect(cfg), cfg.directory)
    jane = directory.lookup("corp\\JDOE")
    assert (jane.backend, jane.mailbox_id) == ("EXCH01", "2f33fdf7-d3ce-52c7-abc2-66918a246a25")
    for name in ("jdoe", "jane.doe@corp.example.com", "jd@corp.example.com"):
        assert directory.lookup(name) == jane


GOOD_ENTRY = "dn: uid=erin,dc=example,dc=com\nuid: erin\nmail: erin@exam\n ple.com\nmailHost: A\n\n"


@pytest.mark.parametrize("text, line, reason", [
    (GOOD_ENTRY + "dn: uid=x,dc=example,dc=com\nuid: x\nmail: x@exa\n mple.com\n"
     "mail:: eEBleGFtcGxlLm\nmailHost: A\n", 11, "bad LDIF: Incorrect padding"),
    (GOOD_ENTRY + "dn: uid=x,dc=example,dc=com\njpegPhoto:: YWxpY2\nuid: x\n"
     "mail:: eEBleGFtcGxlLm\nmailHost: A\n", 10, "bad LDIF: Incorrect padding"),
    (GOOD_ENTRY + "dn: uid=x,dc=example,dc=com\nuid x\nmailHost: A\n", 8,
     "bad LDIF: a line without ':' (expected 'attribute: value')"),
    (GOOD_ENTRY + "# comment\nuid: x\nmailHost: A\n", 8,
     "bad LDIF: First line of record does not start with 'dn:'"),
    (GOOD_ENTRY + "dn: not a dn\nuid: x\nmailHost: A\n", 7,
     "bad LDIF: No valid string-representation of distinguished name"),
    (GOOD_ENTRY + "dn: uid=x,dc=example,dc=com\nchangetype: modify\nreplace: mailHost\n"
     "mailHost: B\n", 7, "LDIF change records (changetype:) are not a directory export"),
    (GOOD_ENTRY + "dn: uid=x,dc=example,dc=com\nuid: x\nmailHost: A\n\n"
     "dn: uid=y,dc=example,dc=com\nuid: y\nmail: ERIN@example.com\nmailHost: B\n", 11,
     "duplicate login 'erin@example.com' (first in the entry on line 1)"),
])
def test_malformed_ldif_names_the_line_and_keeps_the_live_generation(
        cfg, directory, write_csv, client, text, line, reason):
    assert sync(cfg, write_csv(FIRST))[0] == 0
    path = write_csv(text, name=f"bad-{line}-{len(text)}.ldif")
    status, lines = sync(cfg, path)
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith(f"sync export: {path}:{line}: "), lines
    assert reason in lines[0]
    assert client.get(records.CURRENT_KEY) == b"1"
    assert generation_keys(client) == [b"mailgate:dir:gen:1"]
    assert directory.lookup("alice").backend == "A"
    assert directory.lookup("erin") is None
