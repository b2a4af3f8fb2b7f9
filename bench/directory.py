"""``python -m bench.directory``: warm the directory cache with 1,000,000 mailboxes from a CSV
and from an LDIF export, then time lookups under concurrent load.

Everything runs on loopback in a temporary folder: a private redis-server (tests/servers.py),
the export files it generates, and ``python -m gateway sync export`` as an operator runs it.
Lookups go through ``Directory.lookup`` (one EVALSHA per login) from several client processes,
each running gevent greenlets as a worker does; every lookup is timed on its own.

Targets (the directory issue): warm-up in 30 s or less, lookup p99 of 1 ms or less.  The
loads are paced (open loop): a closed loop of busy clients on a 2-core machine measures the
operating system's time slices (a preempted client waits ~4 ms), not the directory.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import servers  # noqa: E402  (tests/servers.py: RedisServer)

BACKENDS = ("A", "B", "C", "D")


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.directory", description=__doc__)
    parser.add_argument("--mailboxes", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2, help="lookup client processes")
    parser.add_argument("--greenlets", type=int, default=8, help="concurrent lookups each")
    parser.add_argument("--rates", default="1000,2000,5000",
                        help="lookups per second, all clients together, one load run each "
                             "(paced: each lookup starts on its schedule, as logins arrive)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a load run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--csv-only", type=int, default=0, metavar="N",
                        help="only warm from CSV into an empty cache, N times (the sync's "
                             "write path; compare before/after a change on a busy machine)")
    options = parser.parse_args(argv)
    options.rates = [int(rate) for rate in options.rates.split(",") if rate.strip()]
    return options


def login(index: int) -> str:
    return f"user{index:07d}@example.com"


def write_csv(path: Path, count: int) -> None:
    with open(path, "w") as fh:
        fh.write("login,backend,backend_login,mailbox_id\n")
        for start in range(0, count, 10_000):
            fh.write("".join(f"{login(i)},{BACKENDS[i % 4]},,m{i}\n"
                             for i in range(start, min(start + 10_000, count))))


def write_ldif(path: Path, count: int) -> None:
    """An ``ldapsearch -LLL`` style dump: uid + mail (the same login name), mailHost."""
    with open(path, "w") as fh:
        fh.write("version: 1\n\n")
        for start in range(0, count, 10_000):
            fh.write("".join(
                f"dn: uid=user{i:07d},ou=people,dc=example,dc=com\n"
                f"objectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
                f"uid: user{i:07d}\ncn: User {i}\nsn: User\nmail: {login(i)}\n"
                f"mailHost: {BACKENDS[i % 4]}\nentryUUID: 00000000-0000-4000-8000-{i:012d}\n\n"
                for i in range(start, min(start + 10_000, count))))


def write_config(path: Path, redis_url: str) -> None:
    backends = "".join(f'[backends.{name}]\naddress = "10.0.0.{n + 1}"\n'
                       for n, name in enumerate(BACKENDS))
    path.write_text(f'[[listen]]\nprotocol = "imap"\naddress = "127.0.0.1:10143"\n'
                    f'[redis]\nurl = "{redis_url}"\ntimeout = 5.0\n{backends}'
                    f'[directory]\nsource = "export"\ndefault_domain = "example.com"\n')


def warm(config: Path, export: Path) -> tuple[float, str]:
    """Seconds ``python -m gateway sync export`` takes, and its summary line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gateway", "sync", "export", str(export),
                             "--config", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"sync failed: {result.stderr}")
    return seconds, result.stderr.strip().splitlines()[-1]


def lookup_client(config_path: str, mailboxes: int, greenlets: int, rate: float,
                  seconds: float, seed: int, pipe) -> None:
    """One client process: ``greenlets`` loops sharing a connection pool, as a worker does,
    each starting a lookup every ``greenlets / rate`` seconds (0 rate: back to back)."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gateway import config as config_mod
    from gateway.directory.cache import Directory, connect
    config = config_mod.load(config_path)
    directory = Directory(connect(config), config.directory)
    rng = random.Random(seed)
    directory.lookup(login(0))               # connect, load the script
    interval = greenlets / rate if rate else 0.0
    timings: list[int] = []
    misses = 0
    deadline = time.monotonic() + seconds

    def loop(offset: float):
        nonlocal misses
        clock = time.perf_counter_ns
        next_start = time.monotonic() + offset
        while next_start < deadline:
            if interval:
                gevent.sleep(max(0.0, next_start - time.monotonic()))
                next_start += interval
            else:
                next_start = time.monotonic()
            name = login(rng.randrange(mailboxes))
            started = clock()
            record = directory.lookup(name)
            timings.append(clock() - started)
            misses += record is None

    started = time.monotonic()
    gevent.joinall([gevent.spawn(loop, interval * i / greenlets) for i in range(greenlets)])
    pipe.send((timings, misses, time.monotonic() - started))
    pipe.close()


def measure_lookups(config: Path, mailboxes: int, processes: int, greenlets: int,
                    rate: float, seconds: float) -> dict:
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(processes)]
    clients = [context.Process(target=lookup_client, args=(
        str(config), mailboxes, greenlets, rate / processes if rate else 0, seconds, seed,
        sender)) for seed, (_, sender) in enumerate(pipes)]
    for client in clients:
        client.start()
    results = []
    for receiver, _ in pipes:
        if not receiver.poll(seconds + 600):
            raise RuntimeError("a lookup client did not answer")
        results.append(receiver.recv())
    for client in clients:
        client.join(10)
        if client.is_alive():
            client.kill()
    timings = sorted(t for result in results for t in result[0])
    elapsed = max(result[2] for result in results)

    def pct(p: float) -> float:
        return timings[min(len(timings) - 1, int(len(timings) * p))] / 1e6

    return {"load": f"{processes} processes × {greenlets} greenlets"
                    + (f", {rate:,.0f}/s paced" if rate else ", back to back"),
            "lookups": len(timings), "misses": sum(r[1] for r in results),
            "per_second": len(timings) / elapsed, "p50": pct(0.50), "p90": pct(0.90),
            "p99": pct(0.99), "p999": pct(0.999), "max": timings[-1] / 1e6}


def main(argv=None) -> int:
    options = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="mailgate-bench-directory-"))
    redis_server = servers.RedisServer(folder / "redis")
    rows, loads = [], []
    try:
        redis_server.start()
        config = folder / "gateway.toml"
        write_config(config, redis_server.url)
        csv_path, ldif_path = folder / "export.csv", folder / "export.ldif"
        write_csv(csv_path, options.mailboxes)
        if options.csv_only:
            return warm_csv_only(redis_server, config, csv_path, options)
        write_ldif(ldif_path, options.mailboxes)
        runs = (("warm {n} from CSV (empty cache)", csv_path, True, "≤ 30 s"),
                ("warm {n} from LDIF (empty cache)", ldif_path, True, "≤ 30 s"),
                ("re-sync {n} from CSV over them (diff)", csv_path, False, ""))
        for label, path, flush, target in runs:
            if flush:
                with redis_server.client() as client:
                    client.flushdb()
            seconds, summary = warm(config, path)
            rows.append((label.format(n=f"{options.mailboxes:,}"), f"{seconds:.1f} s", target))
            print(f"{rows[-1][0]}: {rows[-1][1]}  ({summary})", flush=True)
        with redis_server.client() as client:
            memory = client.info("memory")["used_memory_human"]
        loads.append(measure_lookups(config, options.mailboxes, 1, 1, 0, options.seconds / 2))
        for rate in options.rates:
            loads.append(measure_lookups(config, options.mailboxes, options.processes,
                                         options.greenlets, rate, options.seconds))
    finally:
        redis_server.stop()
        if options.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(rows, loads, memory)
    return 0


def warm_csv_only(redis_server, config: Path, csv_path: Path, options) -> int:
    """``--csv-only N``: N warm-ups from CSV into an empty cache; each time, then the spread."""
    times = []
    for _ in range(options.csv_only):
        with redis_server.client() as client:
            client.flushdb()
        seconds, summary = warm(config, csv_path)
        times.append(seconds)
        print(f"warm {options.mailboxes:,} from CSV: {seconds:.2f} s  ({summary})", flush=True)
    print(f"min {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s, "
          f"max {max(times):.2f} s over {len(times)} runs")
    return 0


def print_table(rows, loads, memory) -> None:
    print()
    print(f"{'measure':<48} {'result':>12}   target")
    print("-" * 72)
    for name, value, target in rows:
        print(f"{name:<48} {value:>12}   {target}")
    print(f"{'Redis memory, 1M mailboxes':<48} {memory:>12}")
    for load in loads:
        print(f"lookups: {load['load']}  ({load['lookups']:,} lookups, "
              f"{load['per_second']:,.0f}/s, {load['misses']} misses)")
        for key in ("p50", "p90", "p99", "p999", "max"):
            target = "≤ 1 ms" if key == "p99" else ""
            print(f"{'  lookup ' + key:<48} {load[key]:>9.3f} ms   {target}")


if __name__ == "__main__":
    sys.exit(main())
