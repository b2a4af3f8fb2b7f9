"""How far mailgate's login is from the floor of its shape: sessions/s and CPU per session
of a bare gevent proxy (bench/floorproxy.py: a greenlet per login, a callback relay, no
features) next to mailgate and nginx (one worker each unless ``--workers``) and direct
Dovecot, same run.

    python -m bench.floor [--seconds 5] [--rounds 2] [--clients 50] [--burn-us N] [--workers N]

The same session loops as ``python -m bench`` (IMAP: LOGIN SELECT FETCH LOGOUT; POP3: USER
PASS STAT QUIT); rounds alternate the targets.  CPU is the proxy's processes (mailgate with
its Redis, nginx with its auth_http) from /proc; the figures go to bench/results/floor.json (``--json``).
``--burn-us N`` adds a target "burn": the floor proxy burning N µs of CPU per login in a busy
loop, which tells what a dearer proxy alone does to sessions/s and to Dovecot's CPU here.
``--workers N``: mailgate and nginx with N workers, the floor proxy as N processes sharing
its listening sockets (how the cost per session grows with the worker count, floor included).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
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


def _start_floor(dovecot, burn_us: float, processes: int) -> tuple[subprocess.Popen, int, int]:
    imap_port, pop3_port = _free_port(), _free_port()
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench.floorproxy", dovecot.host, str(dovecot.imap_port),
         str(dovecot.pop3_port), str(imap_port), str(pop3_port), str(burn_us), str(processes)],
        stdout=subprocess.PIPE, start_new_session=True)
    if floor.stdout.readline().strip() != b"ready":
        os.killpg(floor.pid, signal.SIGKILL)
        floor.wait()
        raise RuntimeError("the floor proxy did not start")
    return floor, imap_port, pop3_port


def run(seconds: float, rounds: int, clients: int, burn_us: float = 0.0,
        workers: int = 1) -> dict:
    figures: dict = {}
    order = ORDER + (("burn",) if burn_us else ())
    with Stack(32, ("direct", "mailgate", "nginx"), workers=workers) as stack, \
            contextlib.ExitStack() as floors:
        targets = dict(stack.targets)
        for name, burn in (("floor", 0.0), ("burn", burn_us)):
            if name in order:
                floor, imap_port, pop3_port = _start_floor(stack.dovecot, burn, workers)
                floors.callback(floor.wait)
                floors.callback(os.killpg, floor.pid, signal.SIGKILL)   # its forks too
                targets[name] = Target(name, "127.0.0.1", imap_port, pop3_port, floor.pid)
        for protocol in ("imap", "pop3"):
            runs = {name: [] for name in order}
            for turn in range(rounds):
                names = order if turn % 2 == 0 else tuple(reversed(order))
                for name in names:
                    result = scenarios.sessions(targets[name], stack, clients, seconds, protocol)
                    runs[name].append(result)
            figures[protocol] = {name: _summary(results) for name, results in runs.items()}
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
    order = [name for name in ORDER + ("burn",) if name in figures["imap"]]
    lines = [f"{'':34}" + "".join(f"{name:>16}" for name in order)]
    for protocol, by_target in figures.items():
        direct = by_target["direct"]["sessions_per_s"]
        row = f"{protocol.upper() + ' sessions/s (ratio)':34}"
        for name in order:
            rate = by_target[name]["sessions_per_s"]
            row += f"{rate:>9.0f} ({rate / direct:.2f}x)" if name != "direct" else f"{rate:>16.0f}"
        lines.append(row)
        row = f"{'  proxy CPU us/session':34}"
        for name in order:
            cpu = by_target[name]["cpu_us_per_session"]
            row += f"{'-':>16}" if cpu is None else f"{cpu:>16.0f}"
        lines.append(row)
        row = f"{'  Dovecot CPU us/session':34}"
        for name in order:
            row += f"{by_target[name]['dovecot_cpu_us_per_session']:>16.0f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--json", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--burn-us", type=float, default=0.0,
                        help="add the floor proxy burning this much CPU per login (µs)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of mailgate and nginx, processes of the floor proxy")
    args = parser.parse_args(argv)
    figures = run(args.seconds, max(1, args.rounds), args.clients, args.burn_us,
                  max(1, args.workers))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    print(f"(medians of {args.rounds} rounds of {args.seconds:g} s, {args.clients} clients, "
          f"{args.workers} worker(s) or process(es) each; JSON: {args.json})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
