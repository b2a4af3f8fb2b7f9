"""``python -m bench``: IMAP and POP3 sessions/s with 1, 2 and 4 workers, CPU and system calls
per session, 10 MiB FETCH MB/s over 4 connections, NOOP latency and memory per idle
connection, for Dovecot direct, mailgate and nginx's mail proxy, in one run; the table on
stdout, the figures in JSON and the ratios drawn as a PNG chart beside it.

Every server is stopped when the run ends, on success, on error and on Ctrl-C or TERM.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import chart, nginx, report, scenarios
from bench.stack import FETCH_SIZES, Stack
from bench import stack as stack_mod

PHASES = ("sessions", "syscalls", "fetch", "noop", "memory")
PROTOCOLS = ("imap", "pop3")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: short windows, 200 idle connections, one round")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases out of {','.join(PHASES)}")
    parser.add_argument("--targets", default=",".join(report.TARGETS),
                        help="comma-separated targets; direct is always measured")
    parser.add_argument("--clients", type=int, default=50, help="concurrent session clients")
    parser.add_argument("--seconds", type=float, help="sessions window per round (default 5)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts for the sessions phase "
                             "(default 1,2,4; --quick 2); the other phases run with 2 "
                             "(or the first given)")
    parser.add_argument("--strace-clients", type=int, default=10,
                        help="concurrent clients while strace counts system calls")
    parser.add_argument("--strace-seconds", type=float, default=3.0)
    parser.add_argument("--fetch-seconds", type=float, help="FETCH time per round")
    parser.add_argument("--fetch-connections", type=int, default=4)
    parser.add_argument("--noops", type=int, help="NOOPs timed per target and round "
                                                  "(default 20000; --quick 2000)")
    parser.add_argument("--idle", type=int, help="idle connections (default 1000)")
    parser.add_argument("--rounds", type=int, help="rounds of sessions, FETCH and NOOP (default 2)")
    parser.add_argument("--users", type=int, default=32, help="test users in Dovecot")
    parser.add_argument("--gateway-log-level", default="info")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    options = parser.parse_args(argv)
    quick = options.quick
    options.seconds = options.seconds or (2.0 if quick else 5.0)
    options.fetch_seconds = options.fetch_seconds or (1.0 if quick else 3.0)
    options.idle = options.idle or (200 if quick else 1000)
    options.noops = options.noops or (2000 if quick else 20000)
    options.workers = tuple(int(n) for n in (options.workers or ("2" if quick else "1,2,4"))
                            .split(",") if n.strip())
    options.main_workers = 2 if 2 in options.workers else options.workers[0]
    options.rounds = max(1, options.rounds or (1 if quick else 2))
    options.only = _names(parser, options.only, PHASES, "--only")
    options.targets = ("direct",) + tuple(
        t for t in _names(parser, options.targets, report.TARGETS, "--targets") if t != "direct")
    return options


def _names(parser, text: str, allowed, flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(f"{flag}: choose from {','.join(allowed)}")
    return names


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, needed) or soft == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _dovecot_version() -> str:
    binary = stack_mod.servers.find_binary("dovecot")
    if not binary:
        return "?"
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return done.stdout.split()[0] if done.stdout else "?"


def meta(options, argv) -> dict:
    command = "python -m bench" + "".join(" " + shlex.quote(a) for a in argv)
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "status": "running",
            "command": command, "cpus": os.cpu_count(), "python": platform.python_version(),
            "dovecot": _dovecot_version(),
            "nginx": nginx.version() if "nginx" in options.targets else "-",
            "targets": list(options.targets), "phases": list(options.only),
            "options": {k: v for k, v in vars(options).items() if k != "json"},
            "setup": (f"{options.clients} concurrent clients x {options.seconds:g} s x "
                      f"{options.rounds} round(s); gateway and nginx with "
                      f"{'/'.join(map(str, options.workers))} workers (other phases: "
                      f"{options.main_workers})")}


def run_phases(stack, options, results: dict) -> None:
    """The sessions phase once per worker count, then the rest with main_workers.

    The session phases come first: the memory phase leaves Dovecot with a thousand or more
    imap processes (one per idle session, kept for reuse), and IMAP sessions measured after
    it ran at about a third of the rate (direct 400 against 1,100 sessions/s)."""
    order = sorted(options.workers, key=lambda n: n != options.main_workers)
    results["workers"] = {}
    if "sessions" in options.only:
        for workers in order:
            _use_workers(stack, workers)
            targets = [stack.targets[name] for name in options.targets]
            by_protocol = results["workers"][str(workers)] = {}
            for protocol in PROTOCOLS:
                _rounds(stack, options, targets, by_protocol, protocol,
                        lambda t, p=protocol: scenarios.sessions(t, stack, options.clients,
                                                                 options.seconds, p),
                        lambda t, r: scenarios.pooled_sessions(r))
            if workers == options.main_workers:
                results.update(by_protocol)
            elif workers == 1 and "syscalls" in options.only:
                # The issue counts them on one worker; the syscalls phase uses main_workers.
                results["syscalls_1_worker"] = count_syscalls(stack, options, targets[1:])
    if set(options.only) - {"sessions"}:
        _use_workers(stack, options.main_workers)
        targets = [stack.targets[name] for name in options.targets]
        run_single_phases(stack, options, targets, results)


def count_syscalls(stack, options, targets) -> dict:
    """System calls per session, {protocol: {target: figures}}, with the workers running now."""
    found = {}
    for protocol in PROTOCOLS:
        found[protocol] = {}
        for target in targets:
            stack.wait_backend_idle()
            _progress(f"syscalls: {protocol} through {target.name}, {stack.workers} worker(s) "
                      f"(strace)")
            found[protocol][target.name] = scenarios.syscalls(
                target, stack, options.strace_clients, options.strace_seconds, protocol)
    return found


def _use_workers(stack, workers: int) -> None:
    if workers != stack.workers or not stack.proxies:
        _progress(f"restarting mailgate and nginx with {workers} workers")
        stack.start_proxies(workers)
        warm_up(stack)


def run_single_phases(stack, options, targets, results: dict) -> None:
    if "syscalls" in options.only:
        results["syscalls"] = count_syscalls(stack, options, targets)
    if "fetch" in options.only:
        for mailbox in FETCH_SIZES:
            _rounds(stack, options, targets, results, mailbox,
                    lambda t, m=mailbox: scenarios.fetch(t, stack, m, options.fetch_seconds,
                                                         options.fetch_connections),
                    lambda t, r: scenarios.pooled_fetch(r, t.proxy_pgid is not None))
    if "noop" in options.only:
        stack.wait_backend_idle()
        _progress(f"noop: {options.noops} x {options.rounds} per target, "
                  f"in turns of {scenarios.NOOP_BLOCK}")
        results["noop"] = scenarios.noop(targets, stack, options.noops, options.rounds)
    if "memory" in options.only:
        results["memory"] = {}
        for target in targets[1:]:
            stack.wait_backend_idle()
            _progress(f"memory: {options.idle} idle connections through {target.name}")
            results["memory"][target.name] = scenarios.idle_memory(target, stack, options.idle)
        stack.wait_backend_idle()


def _rounds(stack, options, targets, results, phase, measure, pool) -> None:
    """Run ``measure`` for every target, ``options.rounds`` times, rotating the order so
    that no target always goes first; pool the rounds per target."""
    per_target = {t.name: [] for t in targets}
    for number in range(options.rounds):
        shift = number % len(targets)
        for target in targets[shift:] + targets[:shift]:
            stack.wait_backend_idle()
            _progress(f"{phase}: {target.name} (round {number + 1}/{options.rounds})")
            per_target[target.name].append(measure(target))
    results[phase] = {t.name: pool(t, per_target[t.name]) for t in targets}


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    if "nginx" in options.targets and nginx.missing():
        print(f"bench: {nginx.missing()}; or run with --targets direct,mailgate", file=sys.stderr)
        return 2
    raise_nofile(options.idle * 4 + 1024)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    results = {"meta": meta(options, argv)}
    status = 1
    try:
        _progress("starting Dovecot, Redis, mailgate, nginx ...")
        with Stack(options.users, options.targets, options.gateway_log_level,
                   options.keep, options.main_workers) as stack:
            results["meta"]["tmpdir"] = str(stack.tmpdir)
            if options.keep:
                _progress(f"temporary folder: {stack.tmpdir}")
            warm_up(stack)
            run_phases(stack, options, results)
        results["meta"]["status"] = "complete"
        status = 0
    except KeyboardInterrupt:
        results["meta"]["status"] = "interrupted"
        status = 130
    except Exception as exc:
        results["meta"]["status"] = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        print(report.render(results), flush=True)
        report.write_json(results, options.json)
        print(f"JSON: {options.json}", flush=True)
        png = options.json.with_suffix(".png")
        try:
            if chart.draw(results, png):
                print(f"chart: {png}", flush=True)
        except Exception as exc:  # noqa: BLE001 - the figures are kept even if drawing fails
            print(f"chart not drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
    return status


def warm_up(stack) -> None:
    """One session per target and protocol (loads Dovecot's caches and the gateway's Redis
    script)."""
    from bench import imapwire
    login, password = stack.session_users[0]
    for target in stack.targets.values():
        try:
            imapwire.session(target.host, target.port, login, password)
            imapwire.pop3_session(target.host, target.pop3_port, login, password)
        except (OSError, imapwire.ProtocolError) as exc:
            raise RuntimeError(f"a first session through {target.name} failed: "
                               f"{type(exc).__name__}: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
