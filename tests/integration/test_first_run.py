"""First run: the master names unreachable back-ends at start (one line each, without
holding the start up), and `make demo` (deploy/demo.py) serves a working login."""
from __future__ import annotations

import imaplib
import json
import os
import signal
import ssl
import subprocess
import sys
import time

import servers
from conftest import require_binary


def test_unreachable_backends_are_named_at_start(make_gateway, dovecot_a):
    dead = servers.free_port()
    gw = make_gateway(backends={"A": (dovecot_a.host, dovecot_a.imap_port, dovecot_a.pop3_port),
                                "down": ("127.0.0.1", dead, dead)},
                      server_overrides={"probe_backends": True})
    deadline = time.monotonic() + 20
    while "backend down is unreachable" not in gw.log_text():
        assert time.monotonic() < deadline, gw.log_text()[-2000:]
        time.sleep(0.1)
    lines = [l for l in gw.log_text().splitlines() if "unreachable" in l]
    assert len(lines) == 1 and f"imap 127.0.0.1:{dead}: Connection refused" in lines[0]
    assert "backend A " not in gw.log_text()


def test_make_demo_serves_a_login(tmp_path):
    require_binary("dovecot", "dovecot-imapd dovecot-pop3d")
    require_binary("redis-server", "redis-server")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    output = tmp_path / "demo.out"
    with open(output, "wb") as out:
        process = subprocess.Popen([sys.executable, str(servers.REPO_ROOT / "deploy" / "demo.py")],
                                   cwd=servers.REPO_ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "READY " not in output.read_text():
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        text = output.read_text()
        assert "alice@demo.example / alice-demo" in text and "IMAPS 127.0.0.1:" in text
        ready = json.loads(text.split("READY ", 1)[1].splitlines()[0])
        context = ssl.create_default_context(cafile=ready["ca"])
        for backend, users in ready["users"].items():
            login, password = next(iter(users.items()))
            client = imaplib.IMAP4_SSL("127.0.0.1", ready["ports"]["imaps"],
                                       ssl_context=context, timeout=30)
            assert client.login(login, password)[0] == "OK"
            typ, data = client.select("INBOX")
            assert typ == "OK" and int(data[0]) >= 1
            client.logout()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
