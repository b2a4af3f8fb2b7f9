"""TLS figures: handshakes per second (full and resumed) into one gateway worker, and the
memory of an idle logged-in session over IMAPS against the same over plain IMAP.

    python -m bench.tls [--seconds 5] [--sessions 300]

Starts Redis, one Dovecot and a one-worker gateway (IMAPS and plain IMAP) on loopback; the
clients are threads of this process.  Memory is the worker's Pss growth divided by the
sessions opened (both ends stay logged in and idle).
"""
from __future__ import annotations

import argparse
import imaplib
import json
import shutil
import socket
import ssl
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import servers  # tests/servers.py (on sys.path, see bench/__init__.py)
from bench import procstats
from certs import TestCA

USER, PASSWORD = "bench@example.com", "bench-secret"
CLIENT_THREADS = 8


def handshakes(port: int, context: ssl.SSLContext, seconds: float, resume: bool) -> dict:
    """Handshakes/s from CLIENT_THREADS threads (greeting read, then close)."""
    stop = time.monotonic() + seconds
    counts, reused = [0] * CLIENT_THREADS, [0] * CLIENT_THREADS

    def client(index: int) -> None:
        session = None
        while time.monotonic() < stop:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                with context.wrap_socket(raw, session=session if resume else None) as tls:
                    tls.recv(256)
                    reused[index] += tls.session_reused
                    if resume:
                        session = tls.session
            counts[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENT_THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {"handshakes": sum(counts), "per_second": sum(counts) / elapsed,
            "resumed": sum(reused)}


def idle_kib(gateway, port: int, context: ssl.SSLContext | None, count: int) -> dict:
    """Pss growth of the gateway's processes per idle logged-in session."""
    pids = gateway.worker_pids()
    time.sleep(1.5)
    before = procstats.memory_kib(pids)["pss_kib"]

    def open_session(_):
        if context is None:
            client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
        else:
            client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=60)
        client.login(USER, PASSWORD)
        return client

    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(open_session, range(count)))
    time.sleep(1.5)
    after = procstats.memory_kib(pids)["pss_kib"]
    alive = sum(c.noop()[0] == "OK" for c in clients)
    for client in clients:
        client.logout()
    return {"sessions": count, "alive": alive, "kib_per_session": (after - before) / count}


def run(seconds: float, sessions: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mailgate-bench-tls-"))
    try:
        return _measure(root, seconds, sessions)
    finally:
        shutil.rmtree(root, ignore_errors=True)   # the servers' folders, the CA


def _measure(root: Path, seconds: float, sessions: int) -> dict:
    ca = TestCA(root / "ca")
    cert, key = ca.issue("gw", ["127.0.0.1"])
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2   # the session exists after the handshake
    with servers.RedisServer(root / "redis") as redis, \
            servers.Dovecot(root / "dovecot", "bench", {USER: PASSWORD},
                            extra_conf="mail_max_userip_connections = 10000\n") as dovecot:
        gateway = servers.GatewayProcess(
            root / "gateway", backends={"A": (dovecot.host, dovecot.imap_port, dovecot.pop3_port)},
            redis_url=redis.url, workers=1,
            listeners={"imaps": {"protocol": "imap", "tls": "implicit"},
                       "imap": {"protocol": "imap"}},
            sections={"tls": {"cert_file": str(cert), "key_file": str(key)},
                      "server": {"log_level": "warning"}})
        with gateway:
            gateway.route({USER: "A"})
            worker = gateway.worker_pids()
            cpu0 = procstats.cpu_seconds(worker)
            full = handshakes(gateway.ports["imaps"], context, seconds, resume=False)
            cpu1 = procstats.cpu_seconds(worker)
            resumed = handshakes(gateway.ports["imaps"], context, seconds, resume=True)
            cpu2 = procstats.cpu_seconds(worker)
            full["worker_cpu_us"] = procstats.cpu_used(cpu0, cpu1) / full["handshakes"] * 1e6
            resumed["worker_cpu_us"] = procstats.cpu_used(cpu1, cpu2) / resumed["handshakes"] * 1e6
            plain = idle_kib(gateway, gateway.ports["imap"], None, sessions)
            tls = idle_kib(gateway, gateway.ports["imaps"], context, sessions)
    return {"full_handshakes": full, "resumed_handshakes": resumed,
            "idle_plain": plain, "idle_tls": tls}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="TLS handshakes/s and idle memory")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=300)
    args = parser.parse_args(argv)
    result = run(args.seconds, args.sessions)
    print(json.dumps(result, indent=2))
    print(f"full handshakes/s: {result['full_handshakes']['per_second']:.0f} "
          f"({result['full_handshakes']['worker_cpu_us']:.0f} µs worker CPU each); "
          f"resumed: {result['resumed_handshakes']['per_second']:.0f}/s "
          f"({result['resumed_handshakes']['worker_cpu_us']:.0f} µs; "
          f"{result['resumed_handshakes']['resumed']} reused); idle KiB per session: "
          f"TLS {result['idle_tls']['kib_per_session']:.1f}, "
          f"plain {result['idle_plain']['kib_per_session']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
