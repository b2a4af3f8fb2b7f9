"""`make demo`: two throwaway Dovecot back-ends with sample users behind a local gateway.

Starts two Dovecot instances (the test suite's set-up, tests/servers.py) on free loopback
ports, issues a certificate for the gateway from a throwaway CA, writes a gateway config
(IMAPS, IMAP with STARTTLS, POP3S, a health listener, embedded Redis), serves it, loads the
users into the directory and prints how to log in as each.  Ctrl-C (or TERM) stops
everything and removes the temporary folder.

    python deploy/demo.py [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import servers  # noqa: E402  (the test suite's real-server helpers)
from certs import TestCA  # noqa: E402

USERS = {
    "A": {"alice@demo.example": "alice-demo", "carol@demo.example": "carol-demo"},
    "B": {"bob@demo.example": "bob-demo"},
}
LISTENERS = {
    "imaps": {"protocol": "imap", "tls": "implicit"},
    "imap": {"protocol": "imap", "tls": "starttls", "require_tls_for_login": True},
    "pop3s": {"protocol": "pop3", "tls": "implicit"},
    "health": {"protocol": "health"},
}


def start(root: Path) -> tuple[list, servers.GatewayProcess, Path]:
    """The two back-ends and the gateway, started; returns (dovecots, gateway, CA file)."""
    if servers.find_binary("dovecot") is None:
        raise SystemExit("make demo needs Dovecot: apt-get install dovecot-imapd dovecot-pop3d")
    if servers.find_binary("redis-server") is None:
        raise SystemExit("make demo needs redis-server: apt-get install redis-server")
    dovecots = []
    for name, users in USERS.items():
        dovecot = servers.Dovecot(root / f"dovecot-{name}", f"demo-{name}", users)
        dovecots.append(dovecot.start())
    ca = TestCA(root / "tls", "mailgate demo CA")
    cert, key = ca.issue("gateway", ["localhost", "127.0.0.1"])
    backends = {name: (d.host, d.imap_port, d.pop3_port) for name, d in zip(USERS, dovecots)}
    gateway = servers.GatewayProcess(
        root / "gateway", backends=backends, redis_url="", workers=1, listeners=LISTENERS,
        sections={"tls": {"cert_file": str(cert), "key_file": str(key)},
                  "server": {"log_level": "info", "probe_backends": True}})
    gateway.start()
    gateway.route({login: name for name, users in USERS.items() for login in users})
    for dovecot, users in zip(dovecots, USERS.values()):
        for login in users:
            dovecot.deliver(login, f"From: demo@mailgate\r\nTo: {login}\r\nSubject: Welcome "
                                   f"to the mailgate demo\r\n\r\nServed by {dovecot.name}.\r\n")
    return dovecots, gateway, ca.path


def instructions(gateway, ca_path: Path) -> str:
    ports = gateway.ports
    lines = [f"mailgate demo: IMAPS 127.0.0.1:{ports['imaps']}, IMAP+STARTTLS "
             f"127.0.0.1:{ports['imap']}, POP3S 127.0.0.1:{ports['pop3s']}, "
             f"health http://127.0.0.1:{ports['health']}/healthz",
             f"certificate authority: {ca_path}", "log in as:"]
    for name, users in USERS.items():
        for login, password in users.items():
            lines.append(f"  {login} / {password}  (back-end {name})")
    lines.append("for example:")
    login, password = next(iter(USERS["A"].items()))
    lines.append(f"  python3 -c \"import imaplib, ssl; c = imaplib.IMAP4_SSL('127.0.0.1', "
                 f"{ports['imaps']}, ssl_context=ssl.create_default_context(cafile='{ca_path}'));"
                 f" print(c.login('{login}', '{password}')); print(c.select())\"")
    lines.append(f"  openssl s_client -quiet -connect 127.0.0.1:{ports['imaps']} "
                 f"-CAfile {ca_path}")
    lines.append(f"gateway log: {gateway.log_path}")
    lines.append("Ctrl-C stops the demo.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mailgate-demo-"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dovecots, gateway = [], None
    try:
        dovecots, gateway, ca_path = start(root)
        print(instructions(gateway, ca_path), flush=True)
        print("READY " + json.dumps({"ports": gateway.ports, "ca": str(ca_path),
                                     "users": USERS}), flush=True)
        while not stop.wait(1):
            if not gateway.running:
                print(f"the gateway stopped; see {gateway.log_path}", file=sys.stderr)
                return 1
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        for dovecot in dovecots:
            dovecot.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
