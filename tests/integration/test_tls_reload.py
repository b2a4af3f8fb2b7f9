"""Certificates: one clear line (exit 2) for a missing, unreadable or mismatched certificate
at start and in check-config; on HUP new connections get the new certificate while a
session open across the HUP keeps working; a broken certificate on HUP is logged and the
old one stays in use (also for a worker respawned after it)."""
from __future__ import annotations

import imaplib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest

import servers
from helpers import wait_until
from certs import TestCA
from conftest import USERS_A

LISTENERS = {"imaps": {"protocol": "imap", "tls": "implicit"}}


def served_name(port: int, ca) -> str:
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        with context.wrap_socket(raw) as tls:
            return dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "ca")


def install(ca, stem: str, folder) -> dict:
    """Issue a certificate named ``stem``.example.test and copy it to the live paths."""
    cert, key = ca.issue(stem, [f"{stem}.example.test", "127.0.0.1"])
    shutil.copy(cert, folder / "live.pem")
    shutil.copy(key, folder / "live.key")
    return {"cert_file": str(folder / "live.pem"), "key_file": str(folder / "live.key")}


@pytest.mark.parametrize("problem", ["missing", "mismatched", "garbage"])
def test_bad_certificate_is_one_line_at_start(make_gateway, ca, tmp_path, problem):
    files = install(ca, "first", tmp_path)
    if problem == "missing":
        os.unlink(files["cert_file"])
        expected = "cannot read: No such file or directory"
    elif problem == "mismatched":
        _, other_key = ca.issue("other", ["other.example.test"])
        shutil.copy(other_key, files["key_file"])
        expected = "does not match the certificate"
    else:
        (tmp_path / "live.pem").write_text("not a certificate\n")
        expected = "no PEM certificate"
    gw = make_gateway(listeners=LISTENERS, sections={"tls": files}, start=False)
    gw.write_config()
    for command in ("check-config", "serve"):
        result = subprocess.run([sys.executable, "-m", "gateway", command, "--config",
                                 str(gw.config_path)], cwd=servers.REPO_ROOT, env=gw._env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "tls." in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_hup_reloads_certificates_and_keeps_open_sessions(make_gateway, ca, tmp_path):
    files = install(ca, "first", tmp_path)
    gw = make_gateway(listeners=LISTENERS, sections={"tls": files}, workers=1,
                      server_overrides={"graceful_timeout": 120},
                      routes={"alice@example.com": "A"})
    port = gw.ports["imaps"]
    assert served_name(port, ca) == "first.example.test"
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
    client.login("alice@example.com", USERS_A["alice@example.com"])
    client.select("INBOX")
    (first_worker,) = gw.worker_pids()

    install(ca, "second", tmp_path)
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: served_name(port, ca) == "second.example.test")
    assert client.noop()[0] == "OK"            # the session from before the HUP lives on

    (tmp_path / "live.pem").write_text("broken\n")
    since = len(gw.log_text())
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: "new config rejected" in gw.log_text()[since:])
    line = [l for l in gw.log_text()[since:].splitlines() if "new config rejected" in l][0]
    assert "no PEM certificate" in line and "Traceback" not in gw.log_text()[since:]
    assert served_name(port, ca) == "second.example.test"
    # A worker respawned after the rejected HUP still has the certificate loaded before.
    newest = [pid for pid in gw.worker_pids() if pid != first_worker][-1]
    os.kill(newest, signal.SIGKILL)
    assert wait_until(lambda: (p := gw.worker_pids()) and newest not in p and len(p) >= 1)
    assert wait_until(lambda: served_name(port, ca) == "second.example.test")
    assert client.noop()[0] == "OK"
    client.logout()
