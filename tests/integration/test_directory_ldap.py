"""LDAP / Active Directory sync and read-through against a real slapd and a real Redis."""
from __future__ import annotations

import io
import socket
import subprocess
import sys

import ldap3
import pytest
import redis

import directory_data as data
from helpers import hammer_lookups, run_dir
from gateway import config as gateway_config
from gateway.directory import records
from gateway.directory.cache import Directory, DirectoryUnavailable
from gateway.directory.cli import cmd_lookup, cmd_sync_ldap

pytestmark = pytest.mark.integration


RUN_DIR = run_dir()


def make_config(url: str, directory: dict):
    return gateway_config.parse({
        "listen": [{"protocol": "imap", "address": "127.0.0.1:10143"}],
        "redis": {"url": url, "timeout": 5.0},
        "backends": data.BACKENDS,
        "directory": directory,
        # (syncs remember themselves in run_dir: not in the checkout)
        "server": {"run_dir": RUN_DIR},
    }, "test.toml")


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
def people(slapd, db_url, client):
    return make_config(db_url, data.people_config(slapd.url))


@pytest.fixture
def corp(slapd, db_url, client):
    return make_config(db_url, data.corp_config(slapd.url))


def sync(cfg, incremental: bool = False) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = cmd_sync_ldap(cfg, incremental, out=out)
    return status, out.getvalue().splitlines()


def counts(line: str) -> dict[str, int]:
    """{"mailboxes": n, "added": n, ...} of a summary line."""
    fields = line.split(": ", 1)[1].split(", ")
    return {f.split(" ", 1)[1]: int(f.split(" ", 1)[0]) for f in fields
            if f.split(" ", 1)[0].isdigit()}


def lookup(cfg, login: str):
    return Directory.for_config(redis.Redis.from_url(cfg.redis.url), cfg).lookup(login)


@pytest.fixture
def own_ou(slapd, request):
    """A fresh organizational unit for a test that adds and changes entries."""
    admin = slapd.admin()
    name = f"t-{request.node.name[:40]}".replace("[", "-").replace("]", "")
    dn = f"ou={name},{data.SUFFIX}"
    admin.add(dn, "organizationalUnit", {"ou": name})
    yield admin, dn
    admin.search(dn, "(objectClass=*)", attributes=[])
    for entry in sorted(admin.response, key=lambda e: -len(e["dn"])):
        admin.delete(entry["dn"])
    admin.unbind()


def add_ldif(admin, text: str) -> None:
    """Add the entries of LDIF text (no folding, no base64) through LDAP."""
    for block in text.strip().split("\n\n"):
        attributes: dict[str, list] = {}
        dn = ""
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name == "dn":
                dn = value
            elif name == "objectGUID:":
                import base64
                attributes.setdefault("objectGUID", []).append(base64.b64decode(value))
            elif name != "modifyTimestamp":
                attributes.setdefault(name, []).append(value)
        admin.add(dn, attributes=attributes)


# -- paging, full syncs ------------------------------------------------------------------------

def test_the_service_account_needs_paging(slapd):
    connection = ldap3.Connection(ldap3.Server(slapd.host, port=slapd.port),
                                  slapd.SERVICE_DN, slapd.SERVICE_PASSWORD, auto_bind=True)
    connection.search(data.PEOPLE_BASE, "(objectClass=inetOrgPerson)", attributes=["uid"])
    assert connection.result["description"] == "sizeLimitExceeded"
    assert len(connection.response) == 1000 < data.PEOPLE
    connection.unbind()


def test_full_sync_of_the_openldap_tree(people, client):
    status, lines = sync(people)
    assert status == 0, lines
    expected = sum(len(data.person_names(i)) for i in range(data.PEOPLE) if data.person_host(i))
    assert counts(lines[-1])["mailboxes"] == expected > 1000
    assert counts(lines[-1])["added"] == expected
    user3 = lookup(people, "USER0003")                        # uid + default domain
    assert user3.backend == data.HOST_B and user3.source == "ldap"
    assert lookup(people, "first.last0003@Example.com") == user3
    assert len(user3.mailbox_id) == 36                        # entryUUID
    assert lookup(people, "user0004@example.com").backend == data.HOST_A
    assert lookup(people, "user0049@example.com") is None     # no mailHost: no mailbox
    assert lookup(people, "user2597").backend == data.HOST_B  # last page
    stored = client.hgetall(records.LDAP_MARK_KEY)
    assert stored[b"value"] == data.timestamp(data.PEOPLE - 1).encode()
    assert stored[b"generation"] == client.get(records.CURRENT_KEY)
    ids = client.hget(records.mailbox_ids_key(1), user3.mailbox_id).decode().split("\n")
    assert ids == ["user0003@example.com", "first.last0003@example.com"]


def test_full_sync_of_the_active_directory_tree(corp):
    status, lines = sync(corp)
    assert status == 0, lines
    assert counts(lines[-1])["mailboxes"] == 3 * data.AD_USERS
    user = lookup(corp, "AD0007@corp.example.com")
    assert user.backend == "EXCH02"                           # last cn= of the server path
    assert user.mailbox_id == str(data.ad_guid(7))            # objectGUID, little-endian GUID
    for name in data.ad_names(7, "CORP") + ["ad0007"]:
        assert lookup(corp, name) == user, name
    assert lookup(corp, "c=US;a= ;p=Example;o=Exchange;s=ad0007;") is None   # X400 is no login
    assert lookup(corp, "ad0008").backend == "EXCH01"


def test_bind_refused_changes_nothing(slapd, people, client):
    assert sync(people)[0] == 0
    wrong = make_config(people.redis.url, data.people_config(slapd.url, ldap_password="nope"))
    status, lines = sync(wrong)
    assert status == 2 and lines == [f"sync ldap: {slapd.url}: bind as "
                                     f"'{slapd.SERVICE_DN}' refused: invalid credentials"]
    assert client.get(records.CURRENT_KEY) == b"1"


def test_unreachable_server(people, client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = make_config(people.redis.url,
                      data.people_config(f"ldap://127.0.0.1:{port}", ldap_timeout=2))
    status, lines = sync(cfg)
    assert status == 2 and lines[0].startswith(f"sync ldap: ldap://127.0.0.1:{port}: ")
    assert client.get(records.CURRENT_KEY) is None


def test_starttls_and_ldaps_verify_the_certificate(slapd, db_url, client):
    for extra in ({"ldap_start_tls": True}, {"ldap_url": slapd.ldaps_url}):
        cfg = make_config(db_url, data.people_config(slapd.url, **extra))
        status, lines = sync(cfg)
        assert status == 2 and "certificate verify failed" in lines[0], lines
        cfg = make_config(db_url, data.people_config(slapd.url, ldap_ca_file=str(slapd.ca_file),
                                                     **extra))
        status, lines = sync(cfg)
        assert status == 0, lines


def test_atomic_swap_during_an_ldap_full_sync(people):
    assert sync(people)[0] == 0
    directory = Directory.for_config(redis.Redis.from_url(people.redis.url), people)
    with hammer_lookups(directory, "user1234@example.com", "generation") as hammer:
        status, lines = sync(people)
    seen, failures = hammer.seen, hammer.failures
    assert status == 0 and failures == []
    assert counts(lines[-1])["changed"] == 0 and counts(lines[-1])["removed"] == 0
    assert seen[0] == 1 and seen[-1] == 2 and sorted(seen) == seen


# -- incremental syncs and deletion ----------------------------------------------------------

def test_incremental_sync_openldap(slapd, own_ou, db_url, client):
    admin, base = own_ou
    add_ldif(admin, "".join(data.person_ldif(i, base, host=data.HOST_A, stamp=None)
                            for i in range(1, 6)))
    cfg = make_config(db_url, data.people_config(slapd.url, ldap_base=base))
    assert sync(cfg)[0] == 0
    mailbox_1 = lookup(cfg, "user0001").mailbox_id
    admin.modify(f"uid=user0001,{base}", {"mailHost": [(ldap3.MODIFY_REPLACE, [data.HOST_B])]})
    admin.modify(f"uid=user0002,{base}",
                 {"mail": [(ldap3.MODIFY_ADD, ["second0002@example.com"])]})
    admin.modify(f"uid=user0003,{base}",
                 {"mail": [(ldap3.MODIFY_DELETE, ["first.last0003@example.com"])]})
    add_ldif(admin, data.person_ldif(6, base, host=data.HOST_A, stamp=None))
    admin.delete(f"uid=user0004,{base}")
    pubsub = client.pubsub()
    pubsub.subscribe(records.MOVES_CHANNEL)
    pubsub.get_message(timeout=5)
    status, lines = sync(cfg, incremental=True)
    assert status == 0, lines
    assert lines[-1].startswith("sync ldap --incremental: ")
    assert {k: counts(lines[-1])[k] for k in ("added", "changed", "removed")} == \
        {"added": 2, "changed": 1, "removed": 1}
    # the batch's "directory changed" (workers forget the lookups they keep), then its move
    assert records.is_changed_message(pubsub.get_message(timeout=5)["data"])
    move = records.parse_move_message(pubsub.get_message(timeout=5)["data"])
    assert move == ("user0001@example.com", data.HOST_A, data.HOST_B, mailbox_1)
    pubsub.close()
    assert lookup(cfg, "user0001").backend == data.HOST_B
    assert lookup(cfg, "second0002@example.com").backend == data.HOST_A
    assert lookup(cfg, "first.last0003@example.com") is None
    assert lookup(cfg, "user0006").backend == data.HOST_A
    assert lookup(cfg, "user0004") is not None        # modifyTimestamp cannot see deletions
    assert client.get(records.CURRENT_KEY) == b"1"    # written into the live generation
    status, lines = sync(cfg)                         # ... the next full sync removes it
    assert status == 0 and counts(lines[-1])["removed"] == 1
    assert lookup(cfg, "user0004") is None


def test_incremental_sync_active_directory_usn(slapd, own_ou, db_url, client):
    admin, base = own_ou
    add_ldif(admin, "".join(data.ad_user_ldif(i, base, usn=100 + i) for i in range(1, 5)))
    cfg = make_config(db_url, data.corp_config(slapd.url, ldap_base=base))
    assert sync(cfg)[0] == 0
    assert client.hget(records.LDAP_MARK_KEY, "value") == b"104"
    admin.modify(f"cn=AD User 1,{base}", {
        "msExchHomeServerName": [(ldap3.MODIFY_REPLACE, [data.EXCHANGE_PATH + "EXCH01"])],
        "uSNChanged": [(ldap3.MODIFY_REPLACE, ["105"])]})
    admin.modify(f"cn=AD User 2,{base}", {                 # an AD tombstone
        "isDeleted": [(ldap3.MODIFY_ADD, ["TRUE"])], "uSNChanged": [(ldap3.MODIFY_REPLACE, ["106"])]})
    admin.modify(f"cn=AD User 3,{base}", {"sn": [(ldap3.MODIFY_REPLACE, ["unchanged usn"])]})
    status, lines = sync(cfg, incremental=True)
    assert status == 0, lines
    assert counts(lines[-1]) == {"mailboxes": 3, "added": 0, "changed": 3, "removed": 3,
                                 "skipped": 0}
    assert ", generation 1, " in lines[-1]
    assert lookup(cfg, "CORP\\ad0001").backend == "EXCH01"
    assert lookup(cfg, "ad.alias0002@corp.example.com") is None
    assert lookup(cfg, "ad0003").backend == "EXCH02"
    assert client.hget(records.LDAP_MARK_KEY, "value") == b"106"
    assert client.hget(records.mailbox_ids_key(1), str(data.ad_guid(2))) is None
    status, lines = sync(cfg, incremental=True)           # nothing new
    assert status == 0 and counts(lines[-1])["mailboxes"] == 0


def test_incremental_without_a_mark_does_a_full_sync(people, client):
    status, lines = sync(people, incremental=True)
    assert status == 0
    assert lines[0] == ("sync ldap --incremental: warning: the directory cache is "
                        "empty: did a full sync")
    assert lines[-1].startswith("sync ldap --incremental (full): ")
    assert lookup(people, "user0002").backend == data.HOST_A
    changed = make_config(people.redis.url,
                          data.people_config(people.directory.ldap_url, default_domain="x.org"))
    status, lines = sync(changed, incremental=True)
    assert "the [directory] LDAP settings changed since the last full sync" in lines[0]


# -- read-through ----------------------------------------------------------------------------

def test_read_through_finds_caches_and_remembers_misses(slapd, own_ou, db_url, client):
    admin, base = own_ou
    add_ldif(admin, data.person_ldif(1, base, host=data.HOST_A, stamp=None))
    cfg = make_config(db_url, data.people_config(slapd.url, ldap_base=base, negative_ttl=30))
    assert cfg.directory.miss == "read-through"
    assert sync(cfg)[0] == 0
    add_ldif(admin, data.person_ldif(3, base, host=data.HOST_B, stamp=None))
    directory = Directory.for_config(redis.Redis.from_url(db_url), cfg)
    asked = []
    find = directory.resolver.find
    directory.resolver.find = lambda name: asked.append(name) or find(name)
    record = directory.lookup("First.Last0003@example.com")
    assert (record.backend, record.source, record.generation) == (data.HOST_B, "read-through", 1)
    assert directory.lookup("first.last0003@example.com") == record      # now from Redis
    assert directory.lookup("nobody@example.com") is None
    assert directory.lookup("nobody@example.com") is None
    assert asked == ["first.last0003@example.com", "nobody@example.com"]
    assert 0 < client.ttl(records.negative_key("nobody@example.com")) <= 30
    out = io.StringIO()
    assert cmd_lookup(cfg, "first.last0003@example.com", out=out) == 0
    assert "read-through" in out.getvalue()
    status, lines = sync(cfg)          # the full sync finds it too: not added, not changed
    assert counts(lines[-1])["added"] == 1 and counts(lines[-1])["changed"] == 0


def test_read_through_active_directory_names(corp):
    directory = Directory.for_config(redis.Redis.from_url(corp.redis.url), corp)
    record = directory.lookup("CORP\\AD0011")           # empty cache: still answered
    assert (record.backend, record.mailbox_id) == ("EXCH02", str(data.ad_guid(11)))
    assert directory.lookup("ad.alias0011@corp.example.com") == record
    assert directory.lookup("other\\ad0011") is None


def test_read_through_server_down_is_unavailable(people, client):
    assert sync(people)[0] == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = make_config(people.redis.url, data.people_config(
        f"ldap://127.0.0.1:{port}", lookup_timeout=1))
    directory = Directory.for_config(redis.Redis.from_url(people.redis.url), down)
    assert directory.lookup("user0002").backend == data.HOST_A      # cached: no LDAP needed
    with pytest.raises(DirectoryUnavailable):
        directory.lookup("not-synced@example.com")
    assert client.exists(records.negative_key("not-synced@example.com")) == 0
    unknown = make_config(people.redis.url, data.people_config(
        f"ldap://127.0.0.1:{port}", miss="unknown"))
    assert Directory.for_config(redis.Redis.from_url(people.redis.url), unknown) \
        .lookup("not-synced@example.com") is None


def test_master_does_not_import_ldap3():
    code = ("import sys, workers.arbiter, gateway.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ldap3', 'ldif')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=str(data.__file__).rsplit("/tests/", 1)[0], check=True)
    assert result.stdout.strip() == "[]"
