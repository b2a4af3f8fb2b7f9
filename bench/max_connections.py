"""``python -m bench.max_connections``: the issue 12 item 7 figure.

A gateway with 2 workers and ``max_connections = 100`` gets 250 IMAP connections at once; each
connection's first line is read (3 s bound): how many were greeted, refused with ``* BYE`` and
left without any answer.  Before the fix: 231 greeted (above the limit), 0 BYE, 19 silent;
after: 200 greeted, 50 BYE, 0 silent.
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import servers  # noqa: E402


def measure(connections: int, per_worker: int, workers: int) -> tuple[int, int, int]:
    """(greeted, refused, silent) for ``connections`` opened at once."""
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-maxconn-"))
    redis = servers.RedisServer(tmp / "redis").start()
    gateway = servers.GatewayProcess(
        tmp / "gateway", backends={"A": ("127.0.0.1", 1, 2)}, redis_url=redis.url,
        workers=workers, server_overrides={"max_connections": per_worker, "log_level": "info"})
    try:
        gateway.start()
        socks = [socket.create_connection(("127.0.0.1", gateway.imap_port), timeout=3)
                 for _ in range(connections)]
        lines = []
        for sock in socks:
            try:
                lines.append(sock.recv(200))
            except socket.timeout:
                lines.append(b"")
        for sock in socks:
            sock.close()
    finally:
        gateway.stop()
        redis.stop()
    greeted = sum(line.startswith(b"* OK") for line in lines)
    refused = sum(line.startswith(b"* BYE") for line in lines)
    return greeted, refused, connections - greeted - refused


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.max_connections")
    parser.add_argument("--connections", type=int, default=250)
    parser.add_argument("--per-worker", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    greeted, refused, silent = measure(args.connections, args.per_worker, args.workers)
    print(f"{args.connections} connections, max_connections {args.per_worker} x "
          f"{args.workers} workers: {greeted} greeted, {refused} BYE, {silent} without an answer")
    return 0 if silent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
