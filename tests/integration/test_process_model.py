"""The master/worker process model, against the real ``python -m gateway serve`` subprocess."""
from __future__ import annotations

import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

import servers
from helpers import wait_until

REPO = Path(__file__).resolve().parents[2]


def greet(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(200)


def serving(gateway, count: int) -> list[int] | None:
    """The worker pids once there are ``count`` and each has started its listeners (the
    master's ports accept at once: a greeting would otherwise wait on a worker's boot)."""
    pids = gateway.worker_pids()
    if len(pids) != count:
        return None
    started = {int(pid) for pid in re.findall(r"worker pid=(\d+) serving", gateway.log_text())}
    return pids if set(pids) <= started else None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_count_and_both_protocols_answer(make_gateway):
    gateway = make_gateway(workers=3)
    assert wait_until(lambda: serving(gateway, 3))
    assert greet(gateway.imap_port).startswith(b"* OK ")
    assert greet(gateway.pop3_port).startswith(b"+OK ")


def test_killed_worker_is_replaced(make_gateway):
    gateway = make_gateway(workers=2)
    before = wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2 and p)
    victim = before[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    after = wait_until(lambda: (p := serving(gateway, 2)) and victim not in p and p)
    assert after, gateway.log_text()[-2000:]
    print(f"SIGKILL → replacement worker seen after {time.monotonic() - killed_at:.3f}s")
    assert greet(gateway.imap_port).startswith(b"* OK ")
    assert "died (signal SIGKILL); replacing it" in gateway.log_text()


def test_ttin_and_ttou_change_the_worker_count(make_gateway):
    gateway = make_gateway(workers=2)
    assert wait_until(lambda: len(gateway.worker_pids()) == 2)
    gateway.signal(signal.SIGTTIN)
    assert wait_until(lambda: len(gateway.worker_pids()) == 3)
    gateway.signal(signal.SIGTTOU)
    assert wait_until(lambda: len(gateway.worker_pids()) == 2)
    gateway.signal(signal.SIGTTOU)   # (a signal sent while the same one is pending merges)
    assert wait_until(lambda: len(gateway.worker_pids()) == 1)


def test_hung_worker_is_killed_and_replaced(make_gateway):
    gateway = make_gateway(workers=1, server_overrides={"heartbeat_timeout": 1.5})
    (worker,) = wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 1 and p)
    os.kill(worker, signal.SIGSTOP)   # a worker whose loop no longer runs
    replaced = wait_until(lambda: (p := serving(gateway, 1)) and worker not in p and p)
    assert replaced, gateway.log_text()[-2000:]
    assert "missed its heartbeat" in gateway.log_text()
    assert greet(gateway.imap_port).startswith(b"* OK ")


def test_hup_during_a_stream_of_connections_refuses_none(make_gateway):
    gateway = make_gateway(workers=2)
    old = wait_until(lambda: serving(gateway, 2))
    errors, done = [], []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                if not greet(gateway.imap_port).startswith(b"* OK "):
                    errors.append("bad greeting")
                done.append(1)
            except OSError as exc:
                errors.append(repr(exc))

    # Workers boot slowly on a loaded machine: start once they serve, and count connections
    # until enough went through, rather than for a fixed time.
    assert greet(gateway.imap_port).startswith(b"* OK ")
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Greetings before the HUP, across it, and from the new generation alone after it
        # (counted, not timed: a loaded machine greets fewer per second).
        assert wait_until(lambda: len(done) >= 20)
        gateway.signal(signal.SIGHUP)
        renewed = wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2
                             and not set(p) & set(old) and p)
        served = len(done)
        assert wait_until(lambda: len(done) >= served + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert renewed, gateway.log_text()[-2000:]
    assert errors == []


def test_hup_with_an_invalid_config_keeps_running(make_gateway):
    gateway = make_gateway(workers=1)
    old = wait_until(lambda: gateway.worker_pids())
    good = gateway.config_path.read_text()
    gateway.config_path.write_text(good + "\n[server]\nbogus = 1\n")
    gateway.signal(signal.SIGHUP)
    assert wait_until(lambda: "new config rejected" in gateway.log_text())
    assert gateway.worker_pids() == old
    assert greet(gateway.imap_port).startswith(b"* OK ")


def open_session(gateway) -> imaplib.IMAP4:
    """alice logged in through the gateway, INBOX selected."""
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    client.login("alice@example.com", "alice-secret")
    client.select("INBOX")
    return client


def test_term_lets_an_open_session_finish_then_exits_zero(make_gateway):
    gateway = make_gateway(routes={"alice@example.com": "A"},
                           server_overrides={"graceful_timeout": 4})
    client = open_session(gateway)
    sent = time.monotonic()
    gateway.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert client.noop()[0] == "OK"          # still served while draining
    client.logout()
    assert gateway.process.wait(timeout=15) == 0
    print(f"TERM → master exit after {time.monotonic() - sent:.3f}s (session logged out)")


def test_term_says_bye_to_sessions_that_outstay_the_graceful_timeout(make_gateway):
    gateway = make_gateway(routes={"alice@example.com": "A"},
                           server_overrides={"graceful_timeout": 1})
    client = open_session(gateway)
    sent = time.monotonic()
    gateway.signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=15) == 0
    print(f"TERM → master exit after {time.monotonic() - sent:.3f}s (graceful_timeout 1s)")
    rest = client.sock.recv(4096)
    assert rest.startswith(b"* BYE")


def test_quit_is_a_fast_stop(make_gateway):
    gateway = make_gateway(routes={"alice@example.com": "A"},
                           server_overrides={"graceful_timeout": 30})
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    client.login("alice@example.com", "alice-secret")
    gateway.signal(signal.SIGQUIT)
    assert gateway.process.wait(timeout=10) == 0   # did not wait for the 30 s drain
    assert client.sock.recv(4096).startswith(b"* BYE")


def test_worker_that_fails_at_boot_stops_the_master(make_gateway):
    gateway = make_gateway(start=False, redis_url="nosuchscheme://nowhere")
    gateway.write_config()
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config",
                             str(gateway.config_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3
    assert "failed to boot" in result.stderr
    assert result.stderr.count("worker pid=") < 20   # no respawn loop


def test_worker_that_crashes_after_boot_is_replaced(make_gateway, tmp_path, monkeypatch):
    """An exception out of a serving worker is a crash, not a boot failure: the master
    replaces that worker and keeps running (it used to stop the whole gateway)."""
    flag = tmp_path / "crash-once"
    monkeypatch.setenv("MAILGATE_TEST_CRASH_FILE", str(flag))
    gateway = make_gateway(workers=2, routes={"alice@example.com": "A"})
    before = wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2 and p)
    flag.write_text("")          # one serving worker crashes
    assert wait_until(lambda: not flag.exists())
    assert wait_until(lambda: "crashed after boot" in gateway.log_text())
    after = wait_until(lambda: (p := gateway.worker_pids()) and len(p) == 2
                       and set(p) != set(before) and p)
    assert after, gateway.log_text()[-3000:]
    assert len(set(before) & set(after)) == 1          # only the crashed one was replaced
    assert gateway.running
    assert "replacing it" in gateway.log_text()
    client = open_session(gateway)
    client.logout()



def test_workers_that_keep_crashing_are_replaced_with_a_growing_delay(make_gateway, tmp_path,
                                                                      monkeypatch):
    """A worker that dies again and again (here: the crash hook's file put back each time a
    worker takes it) is replaced at once five times within ten seconds, then after 1 s,
    2 s, ...; a HUP (a new config may be the fix) starts one at once, and the gateway
    serves again."""
    flag = tmp_path / "crash-always"
    monkeypatch.setenv("MAILGATE_TEST_CRASH_FILE", str(flag))
    gateway = make_gateway(workers=1, routes={"alice@example.com": "A"},
                           server_overrides={"status_interval": 0.1})
    stop = threading.Event()

    def keep_crashing():
        while not stop.is_set():
            if not flag.exists():
                flag.write_text("")
            time.sleep(0.02)

    crasher = threading.Thread(target=keep_crashing, daemon=True)
    crasher.start()
    try:
        assert wait_until(lambda: "the next one starts in 2s" in gateway.log_text(), timeout=60)
        status = subprocess.run(
            [sys.executable, "-m", "gateway", "status", "--config", str(gateway.config_path)],
            cwd=REPO, env=gateway._env(), capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        crasher.join()
    assert status.returncode != 0 and "respawn    in " in status.stdout, status.stdout
    flag.unlink(missing_ok=True)
    hup = time.monotonic()
    gateway.signal(signal.SIGHUP)        # in the 2 s backoff: the new generation starts now
    assert wait_until(lambda: "started (generation 1)" in gateway.log_text(), timeout=10)
    assert time.monotonic() - hup < 1.5
    text = gateway.log_text()
    assert "5 workers exited within 10s: the next one starts in 1s" in text
    started = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
               for line in text.splitlines() if "started (generation" in line]
    # The first worker and five replaced at once; the sixth waited its second.
    assert len(started) >= 6
    assert (started[5] - started[4]).total_seconds() >= 0.9, started
    assert gateway.running
    client = wait_until(lambda: _try_session(gateway), timeout=30)
    assert client is not None, gateway.log_text()[-3000:]
    client.logout()


def _try_session(gateway):
    try:
        return open_session(gateway)
    except (OSError, imaplib.IMAP4.error):
        return None

def test_bind_failure_names_the_address_and_exits_2(make_gateway, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        gateway = make_gateway(start=False)
        gateway.write_config()
        text = gateway.config_path.read_text().replace(
            f"127.0.0.1:{gateway.imap_port}", f"127.0.0.1:{port}")
        gateway.config_path.write_text(text)
        result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config",
                                 str(gateway.config_path)], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
    finally:
        busy.close()
    assert result.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in result.stderr


def test_embedded_redis_serves_lookups_and_stops_with_the_master(make_gateway):
    gateway = make_gateway(redis_url="", routes={"alice@example.com": "A"})
    client = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    client.login("alice@example.com", "alice-secret")
    kick = subprocess.run([sys.executable, "-m", "gateway", "kick", "alice@example.com",
                           "--config", str(gateway.config_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert kick.returncode == 0, kick.stderr
    assert client.sock.recv(4096).startswith(b"* BYE")   # the move/kick channel works too
    assert "Traceback" not in gateway.log_text()
    children = [int(p) for p in os.listdir("/proc") if p.isdigit()
                and servers._proc_stat(int(p)) and servers._proc_stat(int(p))[1] == gateway.pid]
    redis_pids = [p for p in children if "redis-server" in servers._cmdline(p)]
    assert len(redis_pids) == 1
    assert gateway.stop() == 0
    assert not alive(redis_pids[0])


def test_pidfile_is_written_and_removed(make_gateway, tmp_path):
    pidfile = tmp_path / "mailgate.pid"
    gateway = make_gateway(server_overrides={"pidfile": str(pidfile)})
    assert pidfile.read_text().strip() == str(gateway.pid)
    assert gateway.stop() == 0
    assert not pidfile.exists()


def test_master_never_imports_gevent_or_protocol_code():
    probe = ("import sys, gateway.__main__, workers.arbiter, workers.services, workers.sockets;"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'greenlet')"
             " or m.startswith(('gateway.imap', 'gateway.pop3', 'gateway.session')));"
             "print(bad)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_check_config_accepts_the_example_and_rejects_typos(tmp_path):
    example = REPO / "deploy" / "gateway.example.toml"
    ok = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                         str(example)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(example.read_text().replace("graceful_timeout", "gracefull_timeout"))
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                             str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}: server.gracefull_timeout: unknown key" in result.stderr
    bad.write_text(example.read_text().replace("home_keepalive = 300.0", "home_keepalive = 0"))
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                             str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}: referrals.home_keepalive: must be between 0.5 and 1800" in result.stderr


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server missing")
def test_example_config_runs_like_make_run(tmp_path):
    """`make run` serves deploy/gateway.example.toml: every listener answers, TERM stops it."""
    example = (REPO / "deploy" / "gateway.example.toml").read_text()
    imap_port, pop3_port = servers.free_port(), servers.free_port()
    health_port = servers.free_port()
    config = tmp_path / "example.toml"
    config.write_text(example.replace("127.0.0.1:10143", f"127.0.0.1:{imap_port}")
                      .replace("127.0.0.1:10110", f"127.0.0.1:{pop3_port}")
                      .replace("127.0.0.1:10080", f"127.0.0.1:{health_port}"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        servers.wait_for_port("127.0.0.1", imap_port, 30, process)
        servers.wait_for_port("127.0.0.1", pop3_port, 30, process)
        assert greet(imap_port).startswith(b"* OK ")
        assert greet(pop3_port).startswith(b"+OK ")
        with socket.create_connection(("127.0.0.1", health_port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.0 200 OK")
        with socket.create_connection(("127.0.0.1", health_port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.0 200")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
