"""TLS figures: handshakes per second (full and resumed) into one gateway worker, the
memory of an idle logged-in session over IMAPS against the same over plain IMAP, and a
10 MiB FETCH over 4 IMAPS connections through the gateway, through nginx's mail proxy and
straight to Dovecot's own IMAPS (each also over plain IMAP, for comparison).

    python -m bench.tls [--seconds 5] [--sessions 300] [--fetch-seconds 3] [--rounds 2]

Starts Redis, one Dovecot (with TLS), a one-worker gateway and nginx with one worker
process (IMAPS and plain IMAP each) on loopback; the handshake and idle clients are threads
of this process, the FETCH clients one process per connection.  Memory is the worker's Pss
growth divided by the sessions opened (both ends stay logged in and idle).  The gateway and
nginx terminate TLS and speak plain IMAP to Dovecot, as deployed.
"""
from __future__ import annotations

import argparse
import contextlib
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
from bench import nginx, procstats, scenarios
from bench.stack import big_message
from certs import TestCA

USER, PASSWORD = "bench@example.com", "bench-secret"
FETCH_USER, FETCH_PASSWORD = "fetch10@example.com", "fetch-secret"
FETCH_SIZE = 10 * 1024 * 1024
FETCH_CONNECTIONS = 4
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


def fetch_rounds(targets: dict, ca_file: str, seconds: float, rounds: int) -> dict:
    """10 MiB FETCH MB/s per target, {name: (port, TLS?, proxy pids or None)}, the targets
    taking turns round by round; per target its rounds pooled as ``python -m bench`` does."""
    found = {name: [] for name in targets}
    for number in range(rounds):
        names = list(targets)
        names = names[number % len(names):] + names[:number % len(names)]
        for name in names:
            port, tls, pids = targets[name]
            found[name].append(scenarios.fetch_from(
                "127.0.0.1", port, FETCH_USER, FETCH_PASSWORD, seconds, FETCH_CONNECTIONS,
                lambda pids=pids: pids() if pids else None, ca_file if tls else None))
    return {name: scenarios.pooled_fetch(runs, targets[name][2] is not None)
            for name, runs in found.items()}


def run(seconds: float, sessions: int, fetch_seconds: float = 3.0, rounds: int = 2) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mailgate-bench-tls-"))
    try:
        return _measure(root, seconds, sessions, fetch_seconds, rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)   # the servers' folders, the CA


def _measure(root: Path, seconds: float, sessions: int, fetch_seconds: float,
             rounds: int) -> dict:
    ca = TestCA(root / "ca")
    cert, key = ca.issue("gw", ["127.0.0.1"])
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2   # the session exists after the handshake
    users = {USER: PASSWORD, FETCH_USER: FETCH_PASSWORD}
    with servers.RedisServer(root / "redis") as redis, \
            servers.Dovecot(root / "dovecot", "bench", users, ssl_files=(cert, key),
                            extra_conf="mail_max_userip_connections = 10000\n") as dovecot:
        dovecot.deliver(FETCH_USER, big_message(FETCH_SIZE))
        gateway = servers.GatewayProcess(
            root / "gateway", backends={"A": (dovecot.host, dovecot.imap_port, dovecot.pop3_port)},
            redis_url=redis.url, workers=1,
            listeners={"imaps": {"protocol": "imap", "tls": "implicit"},
                       "imap": {"protocol": "imap"}},
            sections={"tls": {"cert_file": str(cert), "key_file": str(key)},
                      "server": {"log_level": "warning"}})
        with gateway:
            gateway.route({USER: "A", FETCH_USER: "A"})
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
            # Last: the buffers of a bulk relay would make the idle sessions' growth look
            # smaller (they reuse what the worker's heap grew to).
            fetch = _fetch_phase(root, dovecot, gateway, str(ca.path), (cert, key),
                                 fetch_seconds, rounds)
    return {"full_handshakes": full, "resumed_handshakes": resumed,
            "idle_plain": plain, "idle_tls": tls, "fetch10": fetch}


def _fetch_phase(root: Path, dovecot, gateway, ca_file: str, ssl_files: tuple,
                 seconds: float, rounds: int) -> dict:
    """The FETCH targets: Dovecot, the gateway and (when installed) nginx, each over IMAPS
    and plain IMAP; ``ratio`` is to Dovecot over the same kind of connection."""
    def gateway_pids():
        return procstats.process_group(gateway.pid)

    targets = {"direct tls": (dovecot.imaps_port, True, None),
               "mailgate tls": (gateway.ports["imaps"], True, gateway_pids),
               "direct plain": (dovecot.imap_port, False, None),
               "mailgate plain": (gateway.ports["imap"], False, gateway_pids)}
    with contextlib.ExitStack() as proxies:
        if nginx.missing() is None:
            auth = proxies.enter_context(nginx.AuthHttp(
                root / "auth_http", dovecot.host, dovecot.imap_port, dovecot.pop3_port))
            proxy = proxies.enter_context(nginx.NginxMailProxy(
                root / "nginx", auth.port, workers=1, ssl_files=ssl_files))
            pids = lambda: procstats.process_group(proxy.pid) + [auth.pid]  # noqa: E731
            targets["nginx tls"] = (proxy.imaps_port, True, pids)
            targets["nginx plain"] = (proxy.imap_port, False, pids)
        found = fetch_rounds(targets, ca_file, seconds, rounds)
    for name, figures in found.items():
        direct = found["direct " + name.split()[1]]["mb_per_s"]
        figures["ratio"] = figures["mb_per_s"] / direct if direct else None
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="TLS handshakes/s and idle memory")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--fetch-seconds", type=float, default=3.0,
                        help="FETCH time per target and round")
    parser.add_argument("--rounds", type=int, default=2, help="FETCH rounds (targets in turns)")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.sessions, args.fetch_seconds, max(1, args.rounds))
    print(json.dumps(result, indent=2))
    print(f"full handshakes/s: {result['full_handshakes']['per_second']:.0f} "
          f"({result['full_handshakes']['worker_cpu_us']:.0f} µs worker CPU each); "
          f"resumed: {result['resumed_handshakes']['per_second']:.0f}/s "
          f"({result['resumed_handshakes']['worker_cpu_us']:.0f} µs; "
          f"{result['resumed_handshakes']['resumed']} reused); idle KiB per session: "
          f"TLS {result['idle_tls']['kib_per_session']:.1f}, "
          f"plain {result['idle_plain']['kib_per_session']:.1f}")
    print(f"10 MiB FETCH x{FETCH_CONNECTIONS}, one worker / worker process each, MB/s "
          f"(ratio to Dovecot over the same kind of connection; proxy CPU per 100 MB):")
    for name, figures in result["fetch10"].items():
        ratio = "" if name.startswith("direct") else f" ({figures['ratio']:.2f}x"
        cpu = figures["proxy_cpu_ms_per_100mb"]
        ratio += f"; {cpu:.1f} ms)" if cpu is not None else (")" if ratio else "")
        rounds = [round(rate) for rate in figures["spread"]["mb_per_s"]]
        print(f"  {name:<15} {figures['mb_per_s']:7.0f}{ratio}  rounds {rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
