"""``python -m bench --quick --only noop`` runs end to end, prints its table and leaves no
server behind.  A smoke test of the harness only: no figure is asserted (benchmarks measure,
tests assert behaviour)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import servers

pytestmark = pytest.mark.integration

NEEDED = {"redis-server": "redis-server", "dovecot": "dovecot-imapd dovecot-pop3d",
          "nginx": "nginx-light libnginx-mod-mail"}
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _require_servers() -> None:
    missing = [pkg for name, pkg in NEEDED.items() if servers.find_binary(name) is None]
    if not os.path.exists(MAIL_MODULE):
        missing.append("libnginx-mod-mail")
    if not missing:
        return
    message = f"the bench needs: apt-get install {' '.join(sorted(set(missing)))}"
    if _in_ci():
        pytest.fail(f"{message}; CI must run the bench smoke test", pytrace=False)
    pytest.skip(message)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            cmdline = servers._cmdline(int(entry))
            if text in cmdline:
                found.append(f"{entry}: {cmdline}")
    return found


def test_quick_noop_bench_prints_the_table_and_stops_everything(tmp_path):
    _require_servers()
    result_path = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "noop", "--json", str(result_path)],
        cwd=servers.REPO_ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(servers.REPO_ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NOOP latency p50" in done.stdout
    header = [line.split() for line in done.stdout.splitlines() if line.startswith(" ")]
    assert ["direct", "mailgate", "nginx"] in header
    results = json.loads(result_path.read_text())
    assert results["meta"]["status"] == "complete"
    assert set(results["noop"]) == {"direct", "mailgate", "nginx"}
    assert all(r["p50_us"] > 0 for r in results["noop"].values())
    assert not os.path.exists(results["meta"]["tmpdir"])
    assert _processes_mentioning(results["meta"]["tmpdir"]) == []


def test_floor_bench_prints_its_table_and_stops_everything(tmp_path):
    """``python -m bench.floor``: the bare gevent proxy next to mailgate, nginx and direct,
    and (``--burn-us``) the same proxy burning CPU per login; ``--workers 2``: two workers
    each, the floor proxy as two processes (all of them stopped at the end)."""
    _require_servers()
    result_path = tmp_path / "floor.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.floor", "--seconds", "0.5", "--rounds", "1",
         "--clients", "4", "--burn-us", "50", "--workers", "2", "--json", str(result_path)],
        cwd=servers.REPO_ROOT, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, PYTHONPATH=str(servers.REPO_ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IMAP sessions/s" in done.stdout and "POP3 sessions/s" in done.stdout
    results = json.loads(result_path.read_text())
    for protocol in ("imap", "pop3"):
        for target in ("direct", "floor", "mailgate", "nginx", "burn"):
            assert results[protocol][target]["errors"] == 0
            assert results[protocol][target]["sessions_per_s"] > 0
    assert not _processes_mentioning("bench.floorproxy")


def test_ab_bench_compares_two_folders():
    """``python -m bench.ab``: two gateways from two code folders (here the same one)."""
    _require_servers()
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--a", str(servers.REPO_ROOT), "--b",
         str(servers.REPO_ROOT), "--rounds", "1", "--seconds", "0.5", "--clients", "4",
         "--protocols", "imap", "--b-python", sys.executable],
        cwd=servers.REPO_ROOT, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, PYTHONPATH=str(servers.REPO_ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "imap B/A CPU per round" in done.stdout
    assert "failed sessions" not in done.stderr
    tmpdir = done.stdout.split("servers in ", 1)[1].split()[0]
    assert not os.path.exists(tmpdir)
    assert _processes_mentioning(tmpdir) == []


def test_ab_bench_compares_noop_latency():
    """``python -m bench.ab --noop``: NOOP latency of two gateways and of Dovecot itself."""
    _require_servers()
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--a", str(servers.REPO_ROOT), "--b",
         str(servers.REPO_ROOT), "--noop", "--rounds", "2", "--noops", "300"],
        cwd=servers.REPO_ROOT, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, PYTHONPATH=str(servers.REPO_ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("noop round ") == 2 and "direct " in done.stdout
    assert "noop B - A p50:" in done.stdout and "noop B - A p99:" in done.stdout
    tmpdir = done.stdout.split("servers in ", 1)[1].split()[0]
    assert not os.path.exists(tmpdir)
    assert _processes_mentioning(tmpdir) == []
