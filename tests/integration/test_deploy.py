"""deploy/ exercised: the systemd unit (systemd-analyze verify when present, and its keys),
and deploy/haproxy.cfg run by the real haproxy with test ports in front of TWO gateway
instances: logins land on the right back-end, Dovecot logs the original client address, and
a TERM on one instance drains it without one failed login through HAProxy."""
from __future__ import annotations

import configparser
import imaplib
import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

import servers
from certs import TestCA
from conftest import ROUTES, USERS_A, USERS_B, require_binary

REPO = servers.REPO_ROOT
CLIENT_IP = "127.0.0.2"
FRONTENDS = {":993": "imaps", ":143": "imap", ":995": "pop3s", ":110": "pop3"}
PORT_NAMES = {"993": "imaps", "143": "imap", "995": "pop3s", "110": "pop3"}


def test_systemd_unit(tmp_path):
    unit = REPO / "deploy" / "mailgate.service"
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.optionxform = str
    parsed.read(unit)
    service = parsed["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "gateway serve --config" in service["ExecStart"]
    assert "gateway check-config --config" in service["ExecStartPre"]
    assert int(service["TimeoutStopSec"]) >= 5 + 30 + 5      # drain + graceful + margin
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["KillMode"] == "mixed" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and "2" in service["RestartPreventExitStatus"]
    # Not on a minimal Debian: `make test` installs it (package systemd); elsewhere the
    # verify step skips, and under CI a missing one fails like every other server binary.
    require_binary("systemd-analyze", "systemd")
    text = unit.read_text().replace("/opt/mailgate/.venv/bin/python", str(REPO / ".venv/bin/python"))
    text = text.replace("/etc/mailgate/gateway.toml", str(REPO / "deploy/gateway.example.toml"))
    text = text.replace("WorkingDirectory=/opt/mailgate", f"WorkingDirectory={REPO}")
    (tmp_path / "mailgate.service").write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "mailgate.service")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mailgate.service" not in result.stderr, result.stderr   # no warning about it


def render_haproxy(gateways: list, fronts: dict[str, int]) -> str:
    """deploy/haproxy.cfg with its binds on test ports and gw1/gw2 on the test gateways."""
    lines = []
    for line in (REPO / "deploy" / "haproxy.cfg").read_text().splitlines():
        match = re.match(r"(\s*)bind (:\d+)$", line)
        if match:
            line = f"{match.group(1)}bind 127.0.0.1:{fronts[FRONTENDS[match.group(2)]]}"
        match = re.match(r"(\s*server gw(\d) )10\.0\.0\.\d+:(\d+)(.*) port 8080(.*)", line)
        if match:
            gw = gateways[int(match.group(2)) - 1]
            port = gw.ports[PORT_NAMES[match.group(3)]]
            line = (f"{match.group(1)}127.0.0.1:{port}{match.group(4)} "
                    f"port {gw.ports['health']}{match.group(5)}")
            line = line.replace("inter 1s", "inter 300ms")
        # The test runs unprivileged: a descriptor limit haproxy can reach.
        lines.append(line.replace("maxconn 20000", "maxconn 2000"))
    return "\n".join(lines) + "\n"


class SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT_IP, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=None)


@pytest.fixture
def deployment(tmp_path, make_gateway, redis_server):
    require_binary("haproxy", "haproxy")
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("gw", ["127.0.0.1"])
    proxied = {"proxy_protocol": True}
    listeners = {"imaps": {"protocol": "imap", "tls": "implicit", **proxied},
                 "imap": {"protocol": "imap", "tls": "starttls", **proxied},
                 "pop3s": {"protocol": "pop3", "tls": "implicit", **proxied},
                 "pop3": {"protocol": "pop3", "tls": "starttls", **proxied},
                 "health": {"protocol": "health"}}
    redis_url = redis_server.allocate_db()
    gateways = [make_gateway(listeners=listeners, redis_url=redis_url, workers=1,
                             sections={"tls": {"cert_file": str(cert), "key_file": str(key)}},
                             server_overrides={"graceful_timeout": 30, "drain_delay": 3})
                for _ in range(2)]
    gateways[0].route(ROUTES)
    fronts = {name: servers.free_port() for name in FRONTENDS.values()}
    proxy = servers.HAProxy(tmp_path / "haproxy", render_haproxy(gateways, fronts),
                            fronts.values())
    proxy.start()
    try:
        yield gateways, fronts, ca
    finally:
        proxy.stop()


def login_once(port: int, context, login: str, password: str) -> None:
    client = SourceIMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
    try:
        client.login(login, password)
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_haproxy_example_in_front_of_two_gateways(deployment, dovecot_a, dovecot_b):
    gateways, fronts, ca = deployment
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    for login, users, dovecot in (("alice@example.com", USERS_A, dovecot_a),
                                  ("bob@example.com", USERS_B, dovecot_b)):
        for _ in range(2):      # leastconn: both gateways get some
            login_once(fronts["imaps"], context, login, users[login])
        deadline = time.monotonic() + 15
        while not any(f"user=<{login}>" in l and f"rip={CLIENT_IP}," in l
                      for l in dovecot.log_text().splitlines()):
            assert time.monotonic() < deadline
            time.sleep(0.05)

    # Clients log in in a loop while one instance stops gracefully.
    failures, done, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                login_once(fronts["imaps"], context, "alice@example.com",
                           USERS_A["alice@example.com"])
                done.append(1)
            except Exception as exc:  # noqa: BLE001 - the test reports every failure
                failures.append(repr(exc))

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        before = len(done)
        gateways[0].signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while gateways[0].running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not gateways[0].running
        after_stop = len(done)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert before > 0 and len(done) > after_stop       # logins went on through gw2
    assert "draining" in gateways[0].log_text()
    for gw in gateways:      # both instances served, each logging the original address
        assert f"client={CLIENT_IP} " in gw.log_text()
