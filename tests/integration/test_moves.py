"""Moves and kicks through the real gateway: a sync that moves a mailbox closes its open
sessions on every worker, and the next login lands on the new back-end.

Its own Dovecot pair: the user ``mover`` exists on both back-ends (with the same password),
as a mailbox being moved does while its data is copied.  The directory is slapd (an
organizational unit of this module's own) or a CSV export.
"""
from __future__ import annotations

import imaplib
import poplib
import subprocess
import sys
import time

import ldap3
import pytest
import redis

import directory_data as data
import servers
from helpers import wait_until

pytestmark = pytest.mark.integration

USERS = {"mover": "mover-secret", "stayer": "stayer-secret"}
MOVED = b"* BYE [UNAVAILABLE] Mailbox moved, please reconnect"
KICKED = b"* BYE [UNAVAILABLE] Session closed by an administrator, please reconnect"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two Dovecot back-ends that both hold ``mover`` and ``stayer``."""
    started = []
    try:
        for name in ("MA", "MB"):
            started.append(servers.Dovecot(tmp_path_factory.mktemp(f"dovecot-{name}"), name,
                                           USERS).start())
        yield tuple(started)
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def backends(pair):
    a, b = pair
    return {data.HOST_A: (a.host, a.imap_port, a.pop3_port),
            data.HOST_B: (b.host, b.imap_port, b.pop3_port)}


@pytest.fixture(scope="module")
def people_ou(slapd):
    """ou=movers: mover (mail mover@ and the alias m.over@) and stayer, both on HOST_A."""
    admin = slapd.admin()
    base = f"ou=movers,{data.SUFFIX}"
    admin.add(base, "organizationalUnit", {"ou": "movers"})
    for uid, mails in (("mover", ["mover@example.com", "m.over@example.com"]),
                       ("stayer", ["stayer@example.com"])):
        admin.add(f"uid={uid},{base}", ["inetOrgPerson", "inetLocalMailRecipient"],
                  {"uid": uid, "cn": uid, "sn": uid, "mail": mails, "mailHost": data.HOST_A})
    yield admin, base
    admin.search(base, "(objectClass=*)", attributes=[])
    for entry in sorted(admin.response, key=lambda e: -len(e["dn"])):
        admin.delete(entry["dn"])
    admin.unbind()


def set_host(admin, base: str, uid: str, host: str) -> None:
    admin.modify(f"uid={uid},{base}", {"mailHost": [(ldap3.MODIFY_REPLACE, [host])]})


def ldap_directory(slapd, base: str, **extra) -> dict:
    return data.people_config(slapd.url, ldap_base=base, backend_login_attribute="uid",
                              ldap_filter="(objectClass=inetLocalMailRecipient)", **extra)


def gateway_command(gateway, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gateway", *args,
                             "--config", str(gateway.config_path)],
                            cwd=servers.REPO_ROOT, env=gateway._env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def subscribed_workers(gateway) -> int:
    client = redis.Redis.from_url(gateway.redis_url)
    try:
        return dict(client.pubsub_numsub("mailgate:moves"))[b"mailgate:moves"]
    finally:
        client.close()


def imap_login(gateway, user: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    client.login(user, USERS[user.split("@")[0].replace("m.over", "mover")])
    client.select("INBOX")
    return client


def read_bye(client: imaplib.IMAP4, timeout: float) -> tuple[bytes, float]:
    """The next line the server sends unasked, and how long it took to come."""
    started = time.monotonic()
    client.sock.settimeout(timeout)
    line = client.readline().rstrip(b"\r\n")
    return line, time.monotonic() - started


def has_marker(gateway, user: str, marker: str) -> bool:
    client = imap_login(gateway, user)
    try:
        typ, found = client.search(None, "SUBJECT", f'"{marker}"')
        return typ == "OK" and bool(found[0].split())
    finally:
        client.logout()


def message(marker: str) -> bytes:
    return (f"From: a@example.com\r\nTo: mover@example.com\r\nSubject: {marker}\r\n\r\n"
            f"on the new back-end\r\n").encode()


def mover_on_a(make_gateway, backends, slapd, admin, base):
    """A 2-worker gateway synced from LDAP with "mover" on back-end A, both workers
    subscribed to moves and kicks."""
    set_host(admin, base, "mover", data.HOST_A)
    gateway = make_gateway(backends=backends, workers=2,
                           sections={"directory": ldap_directory(slapd, base)})
    gateway_command(gateway, "sync", "ldap")
    assert wait_until(lambda: subscribed_workers(gateway) == 2)
    return gateway


def test_ldap_move_closes_sessions_and_the_next_login_lands_on_the_new_backend(
        make_gateway, backends, pair, slapd, people_ou):
    admin, base = people_ou
    gateway = mover_on_a(make_gateway, backends, slapd, admin, base)
    by_alias = imap_login(gateway, "m.over@example.com")     # an alias of the mailbox
    by_name = imap_login(gateway, "mover@example.com")
    pop3 = poplib.POP3("127.0.0.1", gateway.pop3_port, timeout=10)
    pop3.user("mover@example.com")
    pop3.pass_("mover-secret")
    stayer = imap_login(gateway, "stayer@example.com")
    marker = f"moved-{time.time_ns()}"
    pair[1].deliver("mover", message(marker))

    set_host(admin, base, "mover", data.HOST_B)
    result = gateway_command(gateway, "sync", "ldap", "--incremental")
    assert "2 changed" in result.stderr     # two login names of one mailbox
    for client in (by_alias, by_name):
        line, waited = read_bye(client, timeout=1.0)
        print(f"BYE {waited * 1000:.1f} ms after the sync job ended")
        assert line == MOVED
    pop3.sock.settimeout(1.0)
    assert pop3._getline()[0] == b"-ERR [SYS/TEMP] Mailbox moved, please reconnect"
    assert stayer.noop()[0] == "OK"                            # other users stay
    assert has_marker(gateway, "mover@example.com", marker)   # the new back-end
    assert has_marker(gateway, "m.over@example.com", marker)
    stayer.logout()


def test_export_resync_move_closes_sessions(make_gateway, backends, pair):
    gateway = make_gateway(backends=backends, workers=2, routes={
        "mover@example.com": (data.HOST_A, "mover"), "m.over@example.com": (data.HOST_A, "mover"),
        "stayer@example.com": (data.HOST_A, "stayer")})
    assert wait_until(lambda: subscribed_workers(gateway) == 2)
    client = imap_login(gateway, "m.over@example.com")
    gateway.route({"mover@example.com": (data.HOST_B, "mover"),
                   "m.over@example.com": (data.HOST_B, "mover"),
                   "stayer@example.com": (data.HOST_A, "stayer")})
    assert read_bye(client, timeout=1.0)[0] == MOVED
    marker = f"export-{time.time_ns()}"
    pair[1].deliver("mover", message(marker))
    assert has_marker(gateway, "m.over@example.com", marker)


def test_kick_closes_every_session_of_the_mailbox(make_gateway, backends, slapd, people_ou):
    admin, base = people_ou
    gateway = mover_on_a(make_gateway, backends, slapd, admin, base)
    sessions = [imap_login(gateway, "mover@example.com") for _ in range(3)]
    stayer = imap_login(gateway, "stayer@example.com")
    result = gateway_command(gateway, "kick", "M.Over")      # the alias, default domain
    assert result.stdout.strip() == "kick: m.over@example.com: sent to 2 workers"
    for client in sessions:
        assert read_bye(client, timeout=1.0)[0] == KICKED
    assert stayer.noop()[0] == "OK"
    stayer.logout()


def test_read_through_login_of_a_name_added_after_the_sync(make_gateway, backends, slapd,
                                                           people_ou):
    admin, base = people_ou
    gateway = make_gateway(backends=backends, workers=1,
                           sections={"directory": ldap_directory(slapd, base)})
    gateway_command(gateway, "sync", "ldap")
    name = f"new.{time.time_ns()}@example.com"
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        client.login(name, USERS["stayer"])                      # unknown: AUTHENTICATIONFAILED
    admin.modify(f"uid=stayer,{base}", {"mail": [(ldap3.MODIFY_ADD, [name])]})
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        client.login(name, USERS["stayer"])                      # negative answer cached
    redis.Redis.from_url(gateway.redis_url).delete(f"mailgate:dir:neg:{name}")
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    client.login(name, USERS["stayer"])                          # not synced: read-through
    client.logout()
    lookup = gateway_command(gateway, "lookup", name)
    assert "read-through" in lookup.stdout


def test_the_master_runs_the_incremental_sync_on_its_schedule(make_gateway, backends, slapd,
                                                               people_ou):
    admin, base = people_ou
    set_host(admin, base, "mover", data.HOST_A)
    gateway = make_gateway(backends=backends, workers=2, sections={
        "directory": ldap_directory(slapd, base, sync_interval=0.5, miss="unknown")})
    assert wait_until(lambda: subscribed_workers(gateway) == 2)
    assert wait_until(lambda: "sync ldap --incremental (full): " in gateway.log_text(),
                      timeout=20), gateway.log_text()[-3000:]
    client = imap_login(gateway, "mover@example.com")
    set_host(admin, base, "mover", data.HOST_B)
    line, waited = read_bye(client, timeout=15)
    print(f"BYE {waited:.2f} s after the LDAP change (sync_interval 0.5 s)")
    assert line == MOVED
    assert "directory sync pid=" in gateway.log_text()


def test_workers_outlive_redis_and_subscribe_again(make_gateway, backends, tmp_path):
    own_redis = servers.RedisServer(tmp_path / "redis").start()
    try:
        gateway = make_gateway(backends=backends, workers=2, redis_url=own_redis.url,
                               routes={"mover@example.com": (data.HOST_A, "mover")})
        workers = wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2 and p)
        assert wait_until(lambda: subscribed_workers(gateway) == 2)
        port = own_redis.port
        own_redis.stop()
        time.sleep(1.5)                        # the listeners notice and back off
        restart_on_port(own_redis, port)
        assert wait_until(lambda: subscribed_workers(gateway) == 2, timeout=20), \
            gateway.log_text()[-3000:]
        assert gateway.worker_pids() == workers
        gateway.route({"mover@example.com": (data.HOST_A, "mover")})
        client = imap_login(gateway, "mover@example.com")
        gateway_command(gateway, "kick", "mover@example.com")
        assert read_bye(client, timeout=1.0)[0] == KICKED
    finally:
        own_redis.stop()


def restart_on_port(server: servers.RedisServer, port: int) -> None:
    original = servers.free_port
    servers.free_port = lambda: port
    try:
        server.start()
    finally:
        servers.free_port = original
