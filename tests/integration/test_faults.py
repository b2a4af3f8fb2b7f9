"""The fault suite: each fault under a steady load of real IMAP sessions (tests/load.py: a few
threads logging in and out in a loop with imaplib).

What must hold (issue 12): HUP refuses no new connection; a SIGKILLed worker drops only its
own sessions; a back-end killed and restarted gives NO [UNAVAILABLE] meanwhile and logins
after; Redis killed and restarted comes back with its cache (or is refilled) and a move made
meanwhile still closes the moved sessions; slapd down during a sync keeps the live generation;
one flooding client and a slowloris crowd do not keep other clients from being served.

No test asserts a duration: the printed figures (``pytest -s``) are for the issue's record.
Long variants are marked ``soak`` (``make test-soak``).
"""
from __future__ import annotations

import imaplib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis

import servers
from helpers import wait_until
from conftest import USERS_A, USERS_B
from load import LoginLoad, one_login, owner_pid

LOAD_USERS = {"alice@example.com": USERS_A["alice@example.com"],
              "bob@example.com": USERS_B["bob@example.com"]}
ROUTES = {"alice@example.com": "A", "bob@example.com": "B"}


def workers_of(gateway, count: int) -> list[int]:
    pids = wait_until(lambda: (p := gateway.worker_pids()) and len(p) == count and p)
    assert pids, gateway.log_text()[-3000:]
    return pids


def embedded_redis_pid(gateway) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = servers._proc_stat(int(entry))
            if stat and stat[1] == gateway.pid and stat[0] != "Z" and \
                    "redis-server" in servers._cmdline(int(entry)):
                return int(entry)
    return None


def gateway_cli(gateway, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config",
                           str(gateway.config_path)], cwd=servers.REPO_ROOT, env=gateway._env(),
                          capture_output=True, text=True, timeout=timeout)


def logged_in(port: int, login: str = "alice@example.com") -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    client.login(login, LOAD_USERS[login])
    client.select("INBOX")
    return client


def no_traceback(gateway) -> None:
    text = gateway.log_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:5000]


# -- the process model ------------------------------------------------------------------------

def test_hup_under_load_fails_no_new_connection(make_gateway):
    gateway = make_gateway(workers=2, routes=ROUTES)
    old = workers_of(gateway, 2)
    with LoginLoad(gateway.imap_port, LOAD_USERS) as load:
        assert load.wait_for_attempts(20)
        hup = time.monotonic()
        gateway.signal(signal.SIGHUP)
        assert wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2
                          and not set(p) & set(old))
        renewed = time.monotonic()
        assert load.wait_for_attempts(20, after=renewed)
    print(f"HUP under load: {load.summary(hup)} from HUP to 20 logins after the renewal")
    assert load.failures() == [], load.failures()[:5]
    no_traceback(gateway)


def test_sigkill_of_one_worker_drops_only_its_sessions(make_gateway):
    gateway = make_gateway(workers=2, routes=ROUTES)
    pids = workers_of(gateway, 2)
    sessions = []
    try:
        # Open sessions until both workers hold some (the kernel picks the worker).
        while len(sessions) < 40 and len({o for _, o in sessions}) < 2 or len(sessions) < 8:
            client = logged_in(gateway.imap_port)
            sessions.append((client, owner_pid(client.sock, gateway.imap_port, pids)))
        victim = sessions[0][1]
        assert victim in pids and {o for _, o in sessions} == set(pids)
        with LoginLoad(gateway.imap_port, LOAD_USERS, threads=3) as load:
            assert load.wait_for_attempts(10)
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2
                              and victim not in p)
            assert load.wait_for_attempts(20, after=time.monotonic())
        dropped, kept = [], []
        for client, owner in sessions:
            try:
                ok = client.noop()[0] == "OK"
            except (imaplib.IMAP4.abort, OSError, EOFError):
                ok = False
            (kept if ok else dropped).append(owner)
        print(f"SIGKILL of a worker: {len(dropped)} of {len(sessions)} open sessions dropped "
              f"(all on the killed worker: {set(dropped) == {victim}}); load: "
              f"{load.summary(killed)}")
        assert set(dropped) == {victim} and victim not in kept
        assert len(dropped) == sum(1 for _, o in sessions if o == victim)
        # New logins: only the ones in flight on the killed worker may fail.
        assert len(load.failures(killed)) <= load.threads, load.failures(killed)
    finally:
        for client, _ in sessions:
            try:
                client.shutdown()
            except OSError:
                pass
    assert gateway.running


# -- a back-end killed and restarted --------------------------------------------------------------

def test_backend_killed_and_restarted_under_load(make_gateway, tmp_path_factory):
    users = {"frank@example.com": "frank-secret"}
    backend = servers.Dovecot(tmp_path_factory.mktemp("dovecot-F"), "F", users)
    backend.start()
    try:
        gateway = make_gateway(backends={"F": (backend.host, backend.imap_port,
                                               backend.pop3_port)},
                               routes={"frank@example.com": "F"})
        with LoginLoad(gateway.imap_port, users, threads=3, pause=0.02) as load:
            assert load.wait_for_successes(0.0)
            backend.stop(signal.SIGKILL)
            down = time.monotonic()
            assert load.wait_for_attempts(15, after=down)
            backend.start()       # same ports
            up = time.monotonic()
            back = load.wait_for_successes(up)
        during = [a for a in load.between(down, up) if a.ended < up]
        print(f"back-end killed: while down {load.summary(down, up)}; logins again "
              f"{(back or 0) - up:.2f} s after the restart")
        assert during and all(a.outcome == "unavailable" for a in during), during[:5]
        assert back is not None, load.summary(up)
        no_traceback(gateway)
    finally:
        backend.stop()


# -- Redis --------------------------------------------------------------------------------------

def test_embedded_redis_killed_comes_back_with_its_cache(make_gateway):
    """Issue 12 item 3: the embedded Redis keeps an append-only file in run_dir; killed, it is
    restarted by the master and loads it (before: every login NO [UNAVAILABLE] for ever)."""
    gateway = make_gateway(redis_url="", routes=ROUTES)
    with LoginLoad(gateway.imap_port, LOAD_USERS) as load:
        assert load.wait_for_successes(0.0)
        pid = embedded_redis_pid(gateway)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        back = load.wait_for_successes(killed)
        assert back is not None, load.summary(killed)
        assert load.wait_for_attempts(40, after=back)
    print(f"embedded redis kill -9: logins work {back - killed:.3f} s later; "
          f"{load.summary(killed)} since the kill")
    assert embedded_redis_pid(gateway) not in (None, pid)
    assert load.failures(back) == []
    no_traceback(gateway)


def test_emptied_embedded_cache_is_refilled_from_the_last_export(make_gateway):
    """No snapshot to load (a FLUSHALL, a lost disk): the master re-runs the last full sync."""
    gateway = make_gateway(redis_url="", routes=ROUTES)
    client = redis.Redis(unix_socket_path=str(gateway.tmpdir / "run" / "redis.sock"))
    with LoginLoad(gateway.imap_port, LOAD_USERS) as load:
        assert load.wait_for_successes(0.0)
        client.flushall()
        emptied = time.monotonic()
        back = load.wait_for_successes(emptied)
        assert back is not None, load.summary(emptied) + gateway.log_text()[-3000:]
    print(f"embedded cache emptied: logins work {back - emptied:.3f} s later; "
          f"{load.summary(emptied, back)} meanwhile")
    # (logins may go on from the workers' recent lookups meanwhile: wait for the master)
    assert wait_until(lambda: "refilling it: python -m gateway sync refill (sync export"
                      in gateway.log_text(), timeout=30), gateway.log_text()[-3000:]
    assert {a.outcome for a in load.failures(emptied)} <= {"unavailable"}


def test_sync_refill_repeats_the_last_sync_only_when_the_cache_is_stale(make_gateway):
    """What the master runs: nothing while the cache is current (a sync by hand since the
    master looked is not undone), the recorded sync when it is empty."""
    gateway = make_gateway(start=False)
    gateway.write_config()
    gateway.route(ROUTES)
    current = gateway_cli(gateway, "sync", "refill")
    assert current.returncode == 0 and "up to date; nothing done" in current.stderr, \
        current.stderr
    cache = redis.Redis.from_url(gateway.redis_url)
    cache.flushdb()
    refilled = gateway_cli(gateway, "sync", "refill")
    assert refilled.returncode == 0 and "sync export: 2 mailboxes" in refilled.stderr, \
        refilled.stderr
    found = gateway_cli(gateway, "lookup", "bob@example.com")
    assert found.returncode == 0 and "B" in found.stdout


def test_external_redis_restarted_empty_is_refilled(make_gateway, tmp_path_factory):
    """An external Redis without persistence comes back empty: the master notices the empty
    cache and re-runs the last full sync from its run_dir state."""
    private = servers.RedisServer(tmp_path_factory.mktemp("redis-volatile")).start()
    try:
        gateway = make_gateway(redis_url=private.url, routes=ROUTES)
        with LoginLoad(gateway.imap_port, LOAD_USERS) as load:
            assert load.wait_for_successes(0.0)
            private.stop(signal.SIGKILL)
            killed = time.monotonic()
            assert load.wait_for_attempts(8, after=killed)
            private.start()     # same port, empty
            restarted = time.monotonic()
            back = load.wait_for_successes(restarted)
            assert back is not None, load.summary(restarted) + gateway.log_text()[-3000:]
        print(f"external redis kill -9 + empty restart: logins work {back - restarted:.3f} s "
              f"after the restart; {load.summary(killed, back)} from kill to recovery")
        assert "the directory cache is empty; refilling it" in gateway.log_text()
        assert {a.outcome for a in load.failures(killed)} <= {"unavailable"}
        no_traceback(gateway)
    finally:
        private.stop()


def test_move_made_while_workers_are_cut_off_from_redis_still_closes(make_gateway,
                                                                      tmp_path_factory):
    """Pub/sub keeps nothing for an absent subscriber: after reconnecting, each worker checks
    its open sessions' routes and closes the moved ones."""
    private = servers.RedisServer(tmp_path_factory.mktemp("redis-moves")).start()
    try:
        gateway = make_gateway(redis_url=private.url, routes=ROUTES)
        client = logged_in(gateway.imap_port)
        private.stop(signal.SIGKILL)
        time.sleep(2.5)    # the workers' reconnect delay grows while Redis is away
        private.start()
        # The move, written and published right after the restart, before the workers are
        # subscribed again.
        export = _export(gateway, {"alice@example.com": "B", "bob@example.com": "B"})
        moved = wait_until(lambda: (r := gateway_cli(gateway, "sync", "export", str(export)))
                           .returncode == 0 and r)   # (the master's refill may hold the lock)
        assert moved, gateway.log_text()[-3000:]
        client.sock.settimeout(30)
        try:
            answer = client.sock.recv(4096)
        except socket.timeout:
            pytest.fail("no BYE:\n" + gateway.log_text()[-6000:])
        print(f"move while cut off: {answer!r}")
        assert answer.startswith(b"* BYE") and b"moved" in answer, answer
        assert wait_until(lambda: "moved to B while this worker was cut off" in
                          gateway.log_text() or "Mailbox moved" in gateway.log_text())
        no_traceback(gateway)
    finally:
        private.stop()


def _export(gateway, routes: dict):
    path = gateway.tmpdir / f"routes-{time.time_ns()}.csv"
    path.write_text("login,backend\n" + "".join(f"{k},{v}\n" for k, v in routes.items()))
    return path


def test_read_through_answers_while_the_cache_is_empty(make_gateway, slapd):
    """With an LDAP directory, a Redis that lost everything still routes logins: each miss
    is asked of LDAP (read-through) until the refill or the next sync is done."""
    import directory_data as data
    gateway = make_gateway(start=False, sections={"directory": data.people_config(slapd.url)})
    gateway.backends = {**gateway.backends, **data.BACKENDS}
    gateway.start()
    cache = redis.Redis.from_url(gateway.redis_url)
    cache.flushdb()
    result = gateway_cli(gateway, "lookup", "user0002@example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "read-through" in result.stdout and data.HOST_A in result.stdout, result.stdout
    assert cache.get("mailgate:dir:current") is None     # answered, nothing invented


# -- the directory server ---------------------------------------------------------------------

def test_slapd_down_during_a_sync_keeps_the_live_generation(make_gateway, tmp_path_factory):
    import directory_data as data
    slapd = servers.Slapd(tmp_path_factory.mktemp("slapd-fault"), data.directory_ldif())
    slapd.start()
    try:
        gateway = make_gateway(start=False, sections={"directory": data.people_config(
            slapd.url, miss="unknown", ldap_page_size=10)})
        gateway.backends = {**gateway.backends, **data.BACKENDS}
        gateway.start()
        gateway.route(ROUTES)
        cache = redis.Redis.from_url(gateway.redis_url)
        live = int(cache.get("mailgate:dir:current"))
        with LoginLoad(gateway.imap_port, LOAD_USERS, threads=3) as load:
            assert load.wait_for_successes(0.0)
            sync = subprocess.Popen(
                [sys.executable, "-m", "gateway", "sync", "ldap", "--config",
                 str(gateway.config_path)], cwd=servers.REPO_ROOT, env=gateway._env(),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            # Down once the sync is talking to it (frozen first, so the sync cannot finish
            # between our look and the kill; it holds the sync lock by then).
            assert wait_until(lambda: _connected_to(slapd.port) or sync.poll() is not None,
                              interval=0.002)
            os.kill(slapd.pid, signal.SIGSTOP)
            assert sync.poll() is None, sync.communicate()[0]
            time.sleep(0.2)
            os.kill(slapd.pid, signal.SIGKILL)
            down = time.monotonic()
            output = sync.communicate(timeout=120)[0]
            assert load.wait_for_attempts(20, after=time.monotonic())
        print(f"slapd killed during a full sync: sync exit {sync.returncode}; "
              f"{output.strip().splitlines()[-1:]}; load {load.summary(down)}")
        assert sync.returncode != 0, output
        assert int(cache.get("mailgate:dir:current")) == live
        assert wait_until(lambda: not cache.exists(f"mailgate:dir:gen:{live + 1}")
                          or cache.ttl(f"mailgate:dir:gen:{live + 1}") > 0)
        assert load.failures() == [], load.failures()[:5]
    finally:
        slapd.stop()


def _connected_to(port: int) -> bool:
    """Some process has an established TCP connection to 127.0.0.1:port."""
    with open("/proc/net/tcp") as fh:
        next(fh)
        return any(int(f[2].rsplit(":", 1)[1], 16) == port and f[3] == "01"
                   for f in (line.split() for line in fh))


# -- hostile clients -----------------------------------------------------------------------------

class Flooder(threading.Thread):
    """One pre-login client sending ``a NOOP`` as fast as the gateway takes it and reading
    every answer (issue 12 item 1: this froze its worker until the heartbeat killed it)."""

    def __init__(self, port: int, command: bytes = b"a NOOP\r\n"):
        super().__init__(daemon=True)
        self.port = port
        self.command = command
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.setblocking(False)
            burst = self.command * 4096
            while not self.stop.is_set():
                try:
                    self.sent += sock.send(burst)
                except BlockingIOError:
                    pass
                try:
                    while sock.recv(1 << 20):
                        pass
                except BlockingIOError:
                    pass
                time.sleep(0)
        except OSError:
            return


@pytest.mark.parametrize("protocol", ["imap", pytest.param("pop3", marks=pytest.mark.soak)])
def test_flooding_client_does_not_starve_the_others(make_gateway, protocol):
    gateway = make_gateway(workers=1, routes=ROUTES)
    (pid,) = workers_of(gateway, 1)
    flooder = Flooder(gateway.ports[protocol],
                      b"a NOOP\r\n" if protocol == "imap" else b"CAPA\r\n")
    with LoginLoad(gateway.imap_port, LOAD_USERS, threads=3) as load:
        assert load.wait_for_successes(0.0)
        flooder.start()
        started = time.monotonic()
        # Longer than the heartbeat timeout (10 s): a frozen worker would be killed.
        time.sleep(12)
        flooder.stop.set()
        flooder.join(10)
    during = load.between(started)
    print(f"{protocol} flood ({flooder.sent / 1e6:.0f} MB sent): {load.summary(started)} from "
          f"the other clients; worker replaced: {gateway.worker_pids() != [pid]}")
    assert gateway.worker_pids() == [pid], "the worker was killed"
    assert len([a for a in during if a.outcome == "ok"]) >= 10
    assert load.failures(started) == []


def slowloris_crowd(port: int, count: int) -> list[socket.socket]:
    crowd = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        crowd.append(sock)
    return crowd


def drip(crowd: list[socket.socket], seconds: float) -> int:
    """One byte a second from every member for ``seconds``; how many are still open."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in crowd:
            try:
                sock.send(b"a")
                sock.recv(4096)
            except (BlockingIOError, OSError):
                pass
        time.sleep(1)
    open_count = 0
    for sock in crowd:
        try:
            open_count += sock.recv(1) != b""
        except BlockingIOError:
            open_count += 1
        except OSError:
            pass
    return open_count


def test_slowloris_crowd_leaves_new_clients_served(make_gateway):
    gateway = make_gateway(workers=2, routes=ROUTES,
                           sections={"imap": {"preauth_timeout": 2}})
    crowd = slowloris_crowd(gateway.imap_port, 200)
    try:
        with LoginLoad(gateway.imap_port, LOAD_USERS, threads=3) as load:
            started = time.monotonic()
            drip(crowd, 5)
        print(f"slowloris crowd of 200: new clients {load.summary(started)}")
        assert load.count("ok", started) >= 10
        assert load.failures(started) == []
    finally:
        for sock in crowd:
            sock.close()


def test_slowloris_crowd_is_cut_off_by_a_total_deadline(make_gateway):
    gateway = make_gateway(workers=2, sections={"imap": {"preauth_timeout": 2,
                                                         "login_deadline": 4}})
    crowd = slowloris_crowd(gateway.imap_port, 50)
    try:
        still_open = drip(crowd, 10)
        print(f"slowloris: {still_open} of 50 still open after 10 s (preauth_timeout 2 s, "
              f"login_deadline 4 s)")
        assert still_open == 0
    finally:
        for sock in crowd:
            sock.close()


# -- soak: the same faults, repeated ------------------------------------------------------------

@pytest.mark.soak
def test_soak_repeated_faults_under_load(make_gateway):
    """``make test-soak``: five HUPs, three worker kills and three embedded Redis kills in a
    row under load; every failure must be a login in flight on a killed worker or during a
    Redis restart."""
    gateway = make_gateway(workers=2, redis_url="", routes=ROUTES)
    with LoginLoad(gateway.imap_port, LOAD_USERS, threads=4) as load:
        assert load.wait_for_successes(0.0)
        for _ in range(5):
            old = workers_of(gateway, 2)
            mark = time.monotonic()
            gateway.signal(signal.SIGHUP)
            assert wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2
                              and not set(p) & set(old))
            assert load.wait_for_attempts(20, after=time.monotonic())
            assert load.failures(mark) == [], load.failures(mark)[:5]
        for _ in range(3):
            victim = workers_of(gateway, 2)[0]
            mark = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2
                              and victim not in p)
            assert load.wait_for_successes(time.monotonic())
            assert len(load.failures(mark)) <= load.threads
        for _ in range(3):
            mark = time.monotonic()
            os.kill(embedded_redis_pid(gateway), signal.SIGKILL)
            back = load.wait_for_successes(mark)
            assert back is not None
            assert {a.outcome for a in load.failures(mark)} <= {"unavailable"}
    print(f"soak: {load.summary()}")
    assert gateway.running
    no_traceback(gateway)
