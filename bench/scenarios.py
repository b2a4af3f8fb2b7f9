"""The measurements, each against one target; every loop is bounded in time and count.

- ``sessions``: client processes (each with a few threads) loop whole sessions for a fixed
  window: IMAP = connect, LOGIN, SELECT, FETCH 1:* (FLAGS RFC822.SIZE), LOGOUT; POP3 =
  connect, USER/PASS, STAT, QUIT.  Sessions/s, and CPU per session of the proxy, its lookup
  helper and Dovecot (utime+stime deltas from /proc).
- ``syscalls``: the same sessions for a short window with ``strace -c -f`` attached to the
  proxy's processes (Dovecot's for direct): system calls per session, and the top calls.
- ``fetch``: connections FETCHing a big message (BODY.PEEK[]) repeatedly, in parallel; MB/s.
- ``noop``: one logged-in connection per target, sequential NOOPs, the targets taking
  turns in blocks; latency percentiles.
- ``idle_memory``: many logged-in idle connections; the proxy's memory growth per connection.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench import imapwire, procstats
from bench.imapwire import ProtocolError, Wire

SPAWN_MARGIN = 1.0     # seconds for the client processes to start before the window opens
MAX_FETCH_ROUNDS = 10000
MIN_FETCH_ROUNDS = 3
NOOP_WARMUP = 500
NOOP_BLOCK = 1000       # NOOPs of one target before the next takes its turn
IDLE_OPENERS = 8       # threads opening the idle connections
THREADS_PER_PROCESS = 10   # concurrent clients per load-generator process
STRACE_ATTACH = 1.0    # seconds for strace to attach before its window opens
SESSION = {"imap": imapwire.session, "pop3": imapwire.pop3_session}


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _client_init() -> None:
    """A client process leaves signals to the bench process, which terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _session_loop(host, port, protocol, credentials, start_at, stop_at) -> dict:
    """One client: sessions back to back until ``stop_at``; counts those that ended
    inside [start_at, stop_at]."""
    done, errors, first_error, latencies, turn = 0, 0, "", [], 0
    run_session = SESSION[protocol]
    _sleep_until(start_at)      # nothing before the window: strace counts from its start
    while True:
        begin = time.monotonic()
        if begin >= stop_at:
            break
        login, password = credentials[turn % len(credentials)]
        turn += 1
        try:
            run_session(host, port, login, password)
        except (OSError, ProtocolError) as exc:
            errors += begin >= start_at
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
            continue
        end = time.monotonic()
        if start_at <= end <= stop_at:
            done += 1
            latencies.append(end - begin)
    return {"done": done, "errors": errors, "first_error": first_error,
            "latencies": latencies}


def _session_client(job) -> dict:
    """One client process: ``threads`` concurrent session loops; its own CPU in the window."""
    host, port, protocol, credentials, threads, start_at, stop_at = job
    results: list[dict] = []

    def loop(offset: int) -> None:
        mine = credentials[offset:] + credentials[:offset]
        results.append(_session_loop(host, port, protocol, mine, start_at, stop_at))

    workers = [threading.Thread(target=loop, args=(i * 7,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    _sleep_until(start_at)
    cpu_start = time.process_time()
    _sleep_until(stop_at)
    cpu = time.process_time() - cpu_start
    for worker in workers:
        worker.join()
    return {"done": sum(r["done"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
            "latencies": [x for r in results for x in r["latencies"]], "cpu": cpu}


def _snapshot(target, stack) -> dict:
    return {"proxy": procstats.cpu_seconds(target.proxy_pids()),
            "helper": procstats.cpu_seconds(target.helper_pids()),
            "dovecot": procstats.cpu_seconds(stack.dovecot_pids())}


def _run_clients(target, stack, protocol: str, clients: int, duration: float, during,
                 margin: float = SPAWN_MARGIN):
    """Run the client processes for one window; ``during(start_at, stop_at)`` runs in this
    process while they do (a snapshot, strace).  Returns the per-process results."""
    credentials = stack.session_users
    port = target.port if protocol == "imap" else target.pop3_port
    start_at = time.monotonic() + margin
    stop_at = start_at + duration
    processes = max(1, -(-clients // THREADS_PER_PROCESS))
    jobs = []
    for i in range(processes):
        threads = clients // processes + (i < clients % processes)
        offset = i * THREADS_PER_PROCESS
        jobs.append((target.host, port, protocol, credentials[offset:] + credentials[:offset],
                     threads, start_at, stop_at))
    with multiprocessing.get_context("fork").Pool(processes, _client_init) as pool:
        pending = pool.map_async(_session_client, jobs, chunksize=1)
        extra = during(start_at, stop_at)
        per_client = pending.get(timeout=duration + 120)
    return per_client, extra


def sessions(target, stack, clients: int, duration: float, protocol: str = "imap") -> dict:
    """Sessions per second through ``target`` and CPU per session (µs) of each party."""
    def during(start_at, stop_at):
        _sleep_until(start_at)
        before = _snapshot(target, stack)
        _sleep_until(stop_at)
        return before, _snapshot(target, stack)

    per_client, (before, after) = _run_clients(target, stack, protocol, clients, duration,
                                               during)
    done = sum(c["done"] for c in per_client)
    latencies = sorted(x for c in per_client for x in c["latencies"])
    result = {
        "protocol": protocol, "clients": clients, "seconds": duration, "sessions": done,
        "errors": sum(c["errors"] for c in per_client),
        "first_error": next((c["first_error"] for c in per_client if c["first_error"]), ""),
        "sessions_per_s": done / duration,
        "session_ms_p50": _percentile(latencies, 50) * 1e3,
        "loadgen_cores": sum(c["cpu"] for c in per_client) / duration,
    }
    for party in ("proxy", "helper", "dovecot"):
        used = procstats.cpu_used(before[party], after[party])
        result[f"{party}_cpu_s"] = used
        result[f"{party}_cpu_us_per_session"] = used / done * 1e6 if done else None
    total = result["proxy_cpu_s"] + result["helper_cpu_s"]
    result["total_cpu_us_per_session"] = total / done * 1e6 if done and target.proxy_pgid \
        else None
    return result


def syscalls(target, stack, clients: int, duration: float, protocol: str = "imap") -> dict:
    """System calls per session of the proxy's processes (Dovecot's for direct), counted by
    ``strace -c -f`` attached for one window of sessions."""
    strace = shutil.which("strace")
    if strace is None:
        return {"error": "strace is not installed (apt-get install strace)"}
    pids = target.proxy_pids() if target.proxy_pgid else stack.dovecot_pids()
    out = tempfile.NamedTemporaryFile(prefix="bench-strace-", suffix=".txt", delete=False)
    out.close()

    def during(start_at, stop_at):
        command = [strace, "-c", "-f", "-qq", "-o", out.name]
        for pid in pids:
            command += ["-p", str(pid)]
        tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        _sleep_until(stop_at)
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
        return tracer.returncode

    try:
        per_client, _ = _run_clients(target, stack, protocol, clients, duration, during,
                                     SPAWN_MARGIN + STRACE_ATTACH)
        with open(out.name) as fh:
            calls = parse_strace_summary(fh.read())
    finally:
        os.unlink(out.name)
    done = sum(c["done"] for c in per_client)
    total = calls.pop("total", 0)
    top = sorted(calls.items(), key=lambda item: -item[1])[:10]
    return {"protocol": protocol, "sessions": done, "calls": total,
            "per_session": total / done if done else None,
            "top_per_session": {name: round(count / done, 2) for name, count in top}
            if done else {}}


def parse_strace_summary(text: str) -> dict[str, int]:
    """``strace -c`` table → {syscall: calls, ..., "total": calls}."""
    calls: dict[str, int] = {}
    column = None
    for line in text.splitlines():
        words = line.split()
        if "calls" in words and "syscall" in words:
            column = words.index("calls") - (1 if words[0] == "%" else 0)
            continue
        if column is None or not words or words[0].startswith("-"):
            continue
        name = words[-1]
        numbers = words[:-1]
        if len(numbers) > column:
            try:
                calls[name] = int(numbers[column])
            except ValueError:
                continue
    return calls


def _logged_in(target, login: str, password: str, timeout: float = 30.0) -> Wire:
    wire = Wire(target.host, target.port, timeout)
    try:
        wire.greeting()
        wire.login(login, password)
    except BaseException:
        wire.close()
        raise
    return wire


def _fetch_client(job) -> dict:
    """One connection: FETCH the big message until ``stop_at`` (at least MIN_FETCH_ROUNDS)."""
    host, port, login, password, start_at, stop_at, tls_ca = job
    wire = Wire(host, port, 30.0, tls_ca=tls_ca)
    try:
        wire.greeting()
        wire.login(login, password)
        wire.command(b"EXAMINE INBOX")
        size = wire.command(b"FETCH 1 BODY.PEEK[]")     # warm-up, and the message's size
        _sleep_until(start_at)
        moved, rounds = 0, 0
        started = time.monotonic()
        while rounds < MAX_FETCH_ROUNDS and (
                rounds < MIN_FETCH_ROUNDS or time.monotonic() < stop_at):
            moved += wire.command(b"FETCH 1 BODY.PEEK[]")
            rounds += 1
        elapsed = time.monotonic() - started
        wire.logout()
    finally:
        wire.close()
    return {"message_bytes": size, "rounds": rounds, "bytes": moved, "seconds": elapsed}


def fetch(target, stack, mailbox: str, seconds: float, connections: int = 4) -> dict:
    """MB/s (10^6 bytes) of ``FETCH 1 BODY.PEEK[]`` repeated over ``connections`` parallel
    connections (one client process each)."""
    login = f"{mailbox}@bench.test"
    return fetch_from(target.host, target.port, login, stack.users[login], seconds,
                      connections, lambda: target.proxy_pids() if target.proxy_pgid else None)


def fetch_from(host: str, port: int, login: str, password: str, seconds: float,
               connections: int, proxy_pids, tls_ca: str | None = None) -> dict:
    """``fetch`` for any IMAP (``tls_ca``: IMAPS) port; ``proxy_pids()`` names the processes
    whose CPU is the relay's (None: a direct connection, no proxy CPU)."""
    start_at = time.monotonic() + SPAWN_MARGIN + 1.0
    stop_at = start_at + seconds
    jobs = [(host, port, login, password, start_at, stop_at, tls_ca)] * connections
    with multiprocessing.get_context("fork").Pool(connections, _client_init) as pool:
        pending = pool.map_async(_fetch_client, jobs, chunksize=1)
        _sleep_until(start_at)
        pids = proxy_pids()
        before = procstats.cpu_seconds(pids or [])
        per_connection = pending.get(timeout=seconds + 300)
        after = procstats.cpu_seconds(pids or [])
    moved = sum(c["bytes"] for c in per_connection)
    elapsed = max(c["seconds"] for c in per_connection)
    proxy_cpu = procstats.cpu_used(before, after)
    return {"message_bytes": per_connection[0]["message_bytes"], "connections": connections,
            "rounds": sum(c["rounds"] for c in per_connection), "seconds": elapsed,
            "bytes": moved, "proxy_cpu_s": proxy_cpu, "mb_per_s": moved / elapsed / 1e6,
            "proxy_cpu_ms_per_100mb": proxy_cpu / moved * 1e11 if pids else None}


def noop(targets, stack, count: int, rounds: int) -> dict:
    """NOOP latency in µs, one logged-in connection per target, ``count`` sequential NOOPs
    per target and round.  The targets take turns in blocks of NOOP_BLOCK (the order
    rotating), so that a noisy minute of this shared machine falls on every target alike;
    whole rounds one after another had put it on one target (the two rounds of one target
    differed by up to 40 µs at p99).  Per target: the percentiles of all its samples, and
    each round's (``rounds``, ``spread``)."""
    login, password = stack.session_users[0]
    wires: dict = {}
    try:
        for target in targets:
            wires[target.name] = _logged_in(target, login, password)
        for wire in wires.values():
            for _ in range(NOOP_WARMUP):
                wire.command(b"NOOP")
        names = list(wires)
        samples = {name: [[] for _ in range(rounds)] for name in names}
        blocks = [NOOP_BLOCK] * (count // NOOP_BLOCK) + \
            ([count % NOOP_BLOCK] if count % NOOP_BLOCK else [])
        clock = time.perf_counter_ns
        turn = 0
        for number in range(rounds):
            for size in blocks:
                shift = turn % len(names)
                turn += 1
                for name in names[shift:] + names[:shift]:
                    command, kept = wires[name].command, samples[name][number]
                    for _ in range(size):
                        begin = clock()
                        command(b"NOOP")
                        kept.append(clock() - begin)
        for wire in wires.values():
            wire.logout()
    finally:
        for wire in wires.values():
            wire.close()
    figures = {}
    for name in names:
        per_round = [_latencies(sorted(kept)) for kept in samples[name]]
        merged = _latencies(sorted(sample for kept in samples[name] for sample in kept))
        merged.update(rounds=per_round, block=NOOP_BLOCK,
                      spread={key: [r[key] for r in per_round] for key in ("p50_us", "p99_us")})
        figures[name] = merged
    return figures


def _latencies(samples: list[int]) -> dict:
    """Percentiles and mean of sorted nanosecond samples, in µs."""
    return {"count": len(samples), "p50_us": _percentile(samples, 50) / 1e3,
            "p90_us": _percentile(samples, 90) / 1e3, "p99_us": _percentile(samples, 99) / 1e3,
            "mean_us": statistics.fmean(samples) / 1e3 if samples else 0.0}


def idle_memory(target, stack, count: int, settle: float = 1.5) -> dict:
    """The proxy's memory growth (Pss and RSS, KiB) per logged-in idle connection."""
    pids = target.proxy_pids()
    time.sleep(settle)
    before = procstats.memory_kib(pids)
    credentials = stack.session_users
    wires: list[Wire] = []
    futures = []
    executor = ThreadPoolExecutor(IDLE_OPENERS)
    try:
        futures += [executor.submit(_logged_in, target, *credentials[i % len(credentials)])
                   for i in range(count)]
        failures = []
        for future in futures:
            try:
                wires.append(future.result(timeout=120))
            except (OSError, ProtocolError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        time.sleep(settle)
        after = procstats.memory_kib(target.proxy_pids())
        alive = sum(_still_alive(wire) for wire in wires)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
    opened = len(wires)
    return {"connections": opened, "failed": len(failures),
            "first_error": failures[0] if failures else "", "alive_after": alive,
            "pss_before_kib": before["pss_kib"], "pss_after_kib": after["pss_kib"],
            "rss_before_kib": before["rss_kib"], "rss_after_kib": after["rss_kib"],
            "pss_kib_per_conn": (after["pss_kib"] - before["pss_kib"]) / opened if opened else None,
            "rss_kib_per_conn": (after["rss_kib"] - before["rss_kib"]) / opened if opened else None}


def _still_alive(wire: Wire) -> bool:
    """The session still answers (the idle connection was a real logged-in session)."""
    try:
        wire.command(b"NOOP")
        return True
    except (OSError, ProtocolError):
        return False


def _percentile(sorted_values, pct: float):
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def pooled_sessions(rounds: list[dict]) -> dict:
    """Several ``sessions`` windows of one target merged as one longer window."""
    merged = dict(rounds[-1])
    done = sum(r["sessions"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    merged.update(sessions=done, seconds=seconds, sessions_per_s=done / seconds,
                  errors=sum(r["errors"] for r in rounds),
                  session_ms_p50=statistics.median(r["session_ms_p50"] for r in rounds),
                  loadgen_cores=statistics.fmean(r["loadgen_cores"] for r in rounds),
                  rounds=rounds)
    for party in ("proxy", "helper", "dovecot"):
        used = sum(r[f"{party}_cpu_s"] for r in rounds)
        merged[f"{party}_cpu_s"] = used
        merged[f"{party}_cpu_us_per_session"] = used / done * 1e6 if done else None
    if merged.get("total_cpu_us_per_session") is not None:
        merged["total_cpu_us_per_session"] = \
            (merged["proxy_cpu_s"] + merged["helper_cpu_s"]) / done * 1e6 if done else None
    merged["spread"] = {key: [r[key] for r in rounds] for key in
                        ("sessions_per_s", "total_cpu_us_per_session", "proxy_cpu_us_per_session")}
    return merged


def pooled_fetch(rounds: list[dict], has_proxy: bool) -> dict:
    """Several ``fetch`` runs of one target merged."""
    merged = dict(rounds[-1])
    moved = sum(r["bytes"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu = sum(r["proxy_cpu_s"] for r in rounds)
    merged.update(bytes=moved, seconds=seconds, mb_per_s=moved / seconds / 1e6,
                  rounds=rounds, proxy_cpu_s=cpu,
                  spread={"mb_per_s": [r["mb_per_s"] for r in rounds]},
                  proxy_cpu_ms_per_100mb=cpu / moved * 1e11 if has_proxy else None)
    return merged
