"""Two versions of mailgate side by side: the same sessions through each, rounds interleaved.

    git worktree add ../mailgate-before <revision>
    python -m bench.ab --a ../mailgate-before --b . [--rounds 4] [--seconds 4] [--workers 1]
    python -m bench.ab --a . --b . --b-python /path/to/venv/bin/python   # another interpreter
    python -m bench.ab --a ../mailgate-before --b . --noop [--rounds 4]   # NOOP latency

On a shared, noisy machine the CPU a session costs moves by 10 to 20 % from one minute to
the next; two gateways (code from the two folders) behind the same Dovecot, each with its own
Redis, measured in alternating rounds (A B, B A, ...) see the same minutes, so the ratio B/A
per round is steady where the absolute figures are not.  Prints CPU µs per session and
sessions/s of each (and what Dovecot spent per session behind it), the ratio per round and
its median, and system calls per session.  ``--noop``: NOOP latency instead (one logged-in
connection to each, and one straight to Dovecot, 20,000 NOOPs each per round in blocks of
1,000 taking turns, as ``python -m bench``'s NOOP phase): p50 and p99 per round, and B − A.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import servers  # tests/servers.py (on sys.path, see bench/__init__.py)
from bench import scenarios
from bench.stack import BACKEND, Stack, Target


def _gateway(stack: Stack, name: str, root: Path, workers: int,
             python: str = sys.executable) -> Target:
    """A gateway started from the code in ``root`` (servers.REPO_ROOT is where it runs), by
    the interpreter ``python`` (with the project's requirements installed)."""
    dovecot = stack.dovecot
    saved = servers.REPO_ROOT
    servers.REPO_ROOT = root
    try:
        redis = stack.enter_context(servers.RedisServer(stack._tmp(f"redis-{name}")))
        gateway = servers.GatewayProcess(
            stack._tmp(f"gateway-{name}"),
            backends={BACKEND: (dovecot.host, dovecot.imap_port, dovecot.pop3_port)},
            redis_url=redis.url, workers=workers, protocols=("imap", "pop3"),
            server_overrides={"log_level": "info"}, python=python)   # as in python -m bench
        stack.enter_context(gateway)
    finally:
        servers.REPO_ROOT = saved
    gateway.route({login: BACKEND for login in stack.users})
    return Target(name, gateway.host, gateway.imap_port, gateway.pop3_port, gateway.pid,
                  redis.pid)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="folder of version A")
    parser.add_argument("--b", type=Path, required=True, help="folder of version B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--protocols", default="imap,pop3")
    parser.add_argument("--noop", action="store_true",
                        help="NOOP latency (IMAP) instead of sessions")
    parser.add_argument("--noops", type=int, default=20000,
                        help="with --noop: NOOPs per target and round")
    parser.add_argument("--a-python", default=sys.executable,
                        help="interpreter that runs gateway A (default: this one)")
    parser.add_argument("--b-python", default=sys.executable,
                        help="interpreter that runs gateway B (default: this one)")
    args = parser.parse_args(argv)
    pythons = {"A": args.a_python, "B": args.b_python}
    roots = {"A": args.a.resolve(), "B": args.b.resolve()}
    for root in roots.values():
        if not (root / "gateway" / "__main__.py").exists():
            parser.error(f"{root}: not a mailgate folder")
    with Stack(32, ("direct",), workers=args.workers) as stack:
        print(f"servers in {stack.tmpdir}", flush=True)
        targets = {name: _gateway(stack, name, root, args.workers, pythons[name])
                   for name, root in roots.items()}
        if args.noop:
            _noop(stack, targets, args.rounds, args.noops)
            return 0
        for protocol in args.protocols.split(","):
            cpu = {name: [] for name in targets}
            rate = {name: [] for name in targets}
            dovecot = {name: [] for name in targets}
            for turn in range(max(1, args.rounds)):
                order = list(targets) if turn % 2 == 0 else list(reversed(list(targets)))
                for name in order:
                    result = scenarios.sessions(targets[name], stack, args.clients,
                                                args.seconds, protocol)
                    if result["errors"]:
                        print(f"{protocol} {name}: {result['errors']} failed sessions "
                              f"({result['first_error']})", file=sys.stderr)
                    cpu[name].append(result["total_cpu_us_per_session"])
                    rate[name].append(result["sessions_per_s"])
                    dovecot[name].append(result["dovecot_cpu_us_per_session"])
            for name in targets:
                run_by = "" if pythons[name] == sys.executable else f", {pythons[name]}"
                print(f"{protocol} {name} ({roots[name]}{run_by}): CPU us/session "
                      f"{'/'.join(f'{c:.0f}' for c in cpu[name])} "
                      f"(median {statistics.median(cpu[name]):.0f}), sessions/s median "
                      f"{statistics.median(rate[name]):.0f}, Dovecot CPU us/session median "
                      f"{statistics.median(dovecot[name]):.0f}")
            ratios = [b / a for a, b in zip(cpu["A"], cpu["B"])]
            print(f"{protocol} B/A CPU per round {' '.join(f'{r:.3f}' for r in ratios)} "
                  f"(median {statistics.median(ratios):.3f})")
            for name, target in targets.items():
                calls = scenarios.syscalls(target, stack, 10, 3, protocol)
                if calls.get("per_session") is not None:
                    print(f"{protocol} {name} system calls per session "
                          f"{calls['per_session']:.1f} {calls['top_per_session']}")
    return 0


def _noop(stack: Stack, targets: dict, rounds: int, count: int) -> None:
    """NOOP latency of A, B and direct Dovecot, ``rounds`` times: p50 / p99 µs and B − A."""
    direct = stack.targets["direct"]
    apart = {"p50_us": [], "p99_us": []}
    for number in range(max(1, rounds)):
        figures = scenarios.noop([direct, *targets.values()], stack, count, 1)
        print("noop round %d: %s" % (number, ", ".join(
            f"{name} {f['p50_us']:.1f} / {f['p99_us']:.1f}" for name, f in figures.items())),
            flush=True)
        for key in apart:
            apart[key].append(figures["B"][key] - figures["A"][key])
    for key, values in apart.items():
        print(f"noop B - A {key[:3]}: {' '.join(f'{v:+.1f}' for v in values)} "
              f"(median {statistics.median(values):+.1f})")


if __name__ == "__main__":
    raise SystemExit(main())
