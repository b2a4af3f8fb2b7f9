"""How far mailgate's login is from the floor of its shape: sessions/s and CPU per session
of a bare gevent proxy (bench/floorproxy.py: a greenlet per login, a callback relay, no
features) next to mailgate (one worker), nginx (one worker) and direct Dovecot, same run.

    python -m bench.floor [--seconds 5] [--rounds 2] [--clients 50]

The same session loops as ``python -m bench`` (IMAP: LOGIN SELECT FETCH LOGOUT; POP3: USER
PASS STAT QUIT); rounds alternate the targets.  CPU is the proxy's processes (mailgate with
its Redis, nginx with its auth_http) from /proc; the figures go to bench/results/floor.json (``--json``).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from bench import scenarios
from bench.stack import Stack, Target

RESULTS = Path(__file__).resolve().parent / "results" / "floor.json"
ORDER = ("direct", "floor", "mailgate", "nginx")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(seconds: float, rounds: int, clients: int) -> dict:
    figures: dict = {}
    with Stack(32, ("direct", "mailgate", "nginx"), workers=1) as stack:
        dovecot = stack.dovecot
        imap_port, pop3_port = _free_port(), _free_port()
        floor = subprocess.Popen(
            [sys.executable, "-m", "bench.floorproxy", dovecot.host, str(dovecot.imap_port),
             str(dovecot.pop3_port), str(imap_port), str(pop3_port)],
            stdout=subprocess.PIPE, start_new_session=True)
        try:
            if floor.stdout.readline().strip() != b"ready":
                raise RuntimeError("the floor proxy did not start")
            targets = dict(stack.targets)
            targets["floor"] = Target("floor", "127.0.0.1", imap_port, pop3_port, floor.pid)
            for protocol in ("imap", "pop3"):
                runs = {name: [] for name in ORDER}
                for turn in range(rounds):
                    names = ORDER if turn % 2 == 0 else tuple(reversed(ORDER))
                    for name in names:
                        result = scenarios.sessions(targets[name], stack, clients, seconds,
                                                    protocol)
                        runs[name].append(result)
                figures[protocol] = {name: _summary(results) for name, results in runs.items()}
        finally:
            floor.kill()
            floor.wait()
    return figures


def _summary(results: list[dict]) -> dict:
    def median(key):
        values = [r[key] for r in results if r.get(key) is not None]
        return statistics.median(values) if values else None
    return {"sessions_per_s": median("sessions_per_s"),
            "cpu_us_per_session": median("total_cpu_us_per_session"),
            "dovecot_cpu_us_per_session": median("dovecot_cpu_us_per_session"),
            "errors": sum(r["errors"] for r in results),
            "rounds": [{"sessions_per_s": r["sessions_per_s"],
                        "cpu_us_per_session": r["total_cpu_us_per_session"]} for r in results]}


def table(figures: dict) -> str:
    lines = [f"{'':34}" + "".join(f"{name:>16}" for name in ORDER)]
    for protocol, by_target in figures.items():
        direct = by_target["direct"]["sessions_per_s"]
        row = f"{protocol.upper() + ' sessions/s (ratio)':34}"
        for name in ORDER:
            rate = by_target[name]["sessions_per_s"]
            row += f"{rate:>9.0f} ({rate / direct:.2f}x)" if name != "direct" else f"{rate:>16.0f}"
        lines.append(row)
        row = f"{'  proxy CPU us/session':34}"
        for name in ORDER:
            cpu = by_target[name]["cpu_us_per_session"]
            row += f"{'-':>16}" if cpu is None else f"{cpu:>16.0f}"
        lines.append(row)
        row = f"{'  Dovecot CPU us/session':34}"
        for name in ORDER:
            row += f"{by_target[name]['dovecot_cpu_us_per_session']:>16.0f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--json", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    figures = run(args.seconds, max(1, args.rounds), args.clients)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    print(f"(medians of {args.rounds} rounds of {args.seconds:g} s, {args.clients} clients; "
          f"JSON: {args.json})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
