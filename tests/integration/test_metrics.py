"""/metrics on the health listener: Prometheus text that counts real logins, failures,
lookups and bytes over every worker, and stays right across worker deaths and HUP; the
shipped Grafana dashboard only asks for metrics the gateway exports."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import servers
from clients import unique_message
from conftest import ROUTES, USERS_A, USERS_B
from ops_helpers import pop_login, scrape, scrape_text, total, try_login, wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def metrics_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b):
    dead_port = servers.free_port()     # nothing listens here: back-end connect errors
    gateway = servers.GatewayProcess(
        tmp_path_factory.mktemp("gateway-metrics"), redis_url=redis_server.allocate_db(),
        protocols=("imap", "pop3", "health"), workers=2,
        backends={"A": (dovecot_a.host, dovecot_a.imap_port, dovecot_a.pop3_port),
                  "B": (dovecot_b.host, dovecot_b.imap_port, dovecot_b.pop3_port),
                  "DOWN": {"address": "127.0.0.1", "imap_port": dead_port,
                           "pop3_port": dead_port, "connect_timeout": 2}})
    try:
        gateway.start()
        gateway.route({**ROUTES, "ghost@example.com": "DOWN"})
        yield gateway
    finally:
        gateway.stop()


def _traffic(gateway, dovecot_a, rounds: int = 6) -> dict:
    """Logins, failures and bytes on both protocols; returns what it did."""
    dovecot_a.deliver("alice@example.com", unique_message("metrics", 20000))
    done = {"ok": 0, "auth": 0, "unavailable": 0}
    clients = []
    for _ in range(rounds):
        client, _ = try_login(gateway, "alice@example.com", USERS_A["alice@example.com"])
        client.select("INBOX")
        client.fetch("1:*", "(RFC822)")
        clients.append(client)
        done["ok"] += 1
        _, answer = try_login(gateway, "bob@example.com", "wrong-password")
        assert "AUTHENTICATIONFAILED" in answer
        done["auth"] += 1
    _, answer = try_login(gateway, "ghost@example.com", "whatever")
    assert "UNAVAILABLE" in answer
    done["unavailable"] += 1
    pop = pop_login(gateway, "bob@example.com", USERS_B["bob@example.com"])
    pop.stat()
    pop.quit()
    done["ok"] += 1
    for client in clients:
        client.logout()
    return done


def test_metrics_count_real_traffic_over_all_workers(metrics_gateway, dovecot_a):
    before = scrape(metrics_gateway)
    done = _traffic(metrics_gateway, dovecot_a)

    def counted():
        now = scrape(metrics_gateway)
        ok = total(now, "mailgate_logins_total", result="ok") - total(
            before, "mailgate_logins_total", result="ok")
        ended = total(now, "mailgate_sessions_ended_total") - total(
            before, "mailgate_sessions_ended_total")
        return now if ok >= done["ok"] and ended >= 2 * 6 + 2 else None

    samples = wait_until(counted)
    assert samples is not None, scrape_text(metrics_gateway)

    def grew(name, **labels):
        return total(samples, name, **labels) - total(before, name, **labels)

    assert grew("mailgate_logins_total", result="ok") == done["ok"]
    assert grew("mailgate_logins_total", result="auth-failed") == done["auth"]
    assert grew("mailgate_logins_total", result="unavailable") == done["unavailable"]
    assert grew("mailgate_logins_total", protocol="pop3", result="ok") == 1
    lookups = done["ok"] + done["auth"] + done["unavailable"]
    assert grew("mailgate_lookups_total", result="hit") == lookups
    assert grew("mailgate_lookup_seconds_count") == lookups
    assert grew("mailgate_relayed_bytes_total", direction="out") > 6 * 20000
    assert grew("mailgate_relayed_bytes_total", direction="in") > 0
    assert grew("mailgate_backend_connect_errors_total", backend="DOWN") == 1
    assert grew("mailgate_backend_connect_seconds_count", backend="A") >= 6
    assert grew("mailgate_connections_total", protocol="imap") >= 2 * 6 + 1
    assert total(samples, "mailgate_workers_alive") == 2
    assert total(samples, "mailgate_redis_up") == 1
    assert total(samples, "mailgate_directory_generation") >= 1
    assert total(samples, "mailgate_directory_sync_age_seconds") >= 0
    # Every worker wrote its own files: the numbers above are sums over both.
    files = os.listdir(Path(metrics_gateway.tmpdir) / "run" / "metrics")
    pids = {int(m.group(1)) for m in map(re.compile(r"_(\d+)\.db$").search, files) if m}
    assert set(metrics_gateway.worker_pids()) <= pids


def test_counters_survive_a_killed_worker_and_hup(metrics_gateway, dovecot_a):
    _traffic(metrics_gateway, dovecot_a, rounds=2)
    settled = wait_until(lambda: _settled(metrics_gateway))
    assert settled is not None
    logins = total(settled, "mailgate_logins_total")
    victim = metrics_gateway.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in metrics_gateway.worker_pids()
                      and len(metrics_gateway.worker_pids()) == 2)
    metrics_gateway.signal(signal.SIGHUP)
    assert wait_until(lambda: total(scrape(metrics_gateway), "mailgate_workers_alive") == 2
                      and len(metrics_gateway.worker_pids()) == 2
                      and victim not in metrics_gateway.worker_pids())
    after = scrape(metrics_gateway)
    assert total(after, "mailgate_logins_total") >= logins   # counters never go down
    assert total(after, "mailgate_connections_current") == 0


def test_kicked_sessions_are_counted(metrics_gateway):
    before = total(scrape(metrics_gateway), "mailgate_sessions_kicked_total", reason="kick")
    client, _ = try_login(metrics_gateway, "carol@example.com", USERS_A["carol@example.com"])
    client.select("INBOX")
    result = subprocess.run([sys.executable, "-m", "gateway", "kick", "carol@example.com",
                             "--config", str(metrics_gateway.config_path)],
                            cwd=servers.REPO_ROOT, env=metrics_gateway._env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: total(scrape(metrics_gateway), "mailgate_sessions_kicked_total",
                                    reason="kick") == before + 1)


def _settled(gateway):
    """A scrape after every session of the traffic has ended (no connection open)."""
    samples = scrape(gateway)
    return samples if total(samples, "mailgate_connections_current") == 0 else None


def test_health_listener_answers_healthz_and_404(metrics_gateway):
    port = metrics_gateway.ports["health"]
    for path, status in (("/healthz", b"200"), ("/nope", b"404")):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            assert sock.recv(100).split()[1] == status


def test_grafana_dashboard_asks_only_for_exported_metrics(metrics_gateway, dovecot_a):
    _traffic(metrics_gateway, dovecot_a, rounds=1)
    wait_until(lambda: total(scrape(metrics_gateway), "mailgate_relayed_bytes_total") > 0)
    exported = {name for name, _ in scrape(metrics_gateway)}
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"]
                   for target in panel.get("targets", [])]
    assert len(expressions) >= 6
    for expr in expressions:
        names = set(re.findall(r"\b(mailgate_[a-z_]+)\b", expr))
        assert names, expr
        assert names <= exported, (expr, names - exported)
