"""The four measurements, each against one target; every loop is bounded in time and count.

- ``sessions``: client processes loop connect → greeting → LOGIN → LOGOUT for a fixed window;
  sessions/s, and CPU per session of the proxy, its lookup helper and Dovecot.
- ``fetch``: one logged-in connection FETCHes a big message (BODY.PEEK[]) repeatedly; MB/s.
- ``noop``: one logged-in connection, sequential NOOPs; latency percentiles.
- ``idle_memory``: many logged-in idle connections; the proxy's memory growth per connection.
"""
from __future__ import annotations

import multiprocessing
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from bench import imapwire, procstats
from bench.imapwire import ProtocolError, Wire

SPAWN_MARGIN = 1.0     # seconds for the client processes to start before the window opens
MAX_FETCH_ROUNDS = 10000
MIN_FETCH_ROUNDS = 3
NOOP_WARMUP = 200
IDLE_OPENERS = 8       # threads opening the idle connections


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _client_init() -> None:
    """A client process leaves signals to the bench process, which terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _session_client(job) -> dict:
    """One client process: sessions back to back until ``stop_at``; counts those that ended
    inside [start_at, stop_at]."""
    host, port, credentials, start_at, stop_at = job
    done, errors, first_error, latencies, turn = 0, 0, "", [], 0
    cpu_start = None
    while True:
        begin = time.monotonic()
        if begin >= stop_at:
            break
        if cpu_start is None and begin >= start_at:
            cpu_start = time.process_time()
        login, password = credentials[turn % len(credentials)]
        turn += 1
        try:
            imapwire.session(host, port, login, password)
        except (OSError, ProtocolError) as exc:
            errors += begin >= start_at
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
            continue
        end = time.monotonic()
        if start_at <= end <= stop_at:
            done += 1
            latencies.append(end - begin)
    cpu = time.process_time() - cpu_start if cpu_start is not None else 0.0
    return {"done": done, "errors": errors, "first_error": first_error,
            "latencies": latencies, "cpu": cpu}


def _snapshot(target, stack) -> dict:
    return {"proxy": procstats.cpu_seconds(target.proxy_pids()),
            "helper": procstats.cpu_seconds(target.helper_pids()),
            "dovecot": procstats.cpu_seconds(stack.dovecot_pids())}


def sessions(target, stack, clients: int, duration: float) -> dict:
    """Sessions per second through ``target`` and CPU per session (µs) of each party."""
    credentials = stack.session_users
    start_at = time.monotonic() + SPAWN_MARGIN
    stop_at = start_at + duration
    jobs = [(target.host, target.port, credentials[i:] + credentials[:i], start_at, stop_at)
            for i in range(clients)]
    with multiprocessing.get_context("fork").Pool(clients, _client_init) as pool:
        pending = pool.map_async(_session_client, jobs, chunksize=1)
        _sleep_until(start_at)
        before = _snapshot(target, stack)
        _sleep_until(stop_at)
        after = _snapshot(target, stack)
        per_client = pending.get(timeout=duration + 60)
    done = sum(c["done"] for c in per_client)
    latencies = sorted(x for c in per_client for x in c["latencies"])
    result = {
        "clients": clients, "seconds": duration, "sessions": done,
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
    return result


def _logged_in(target, login: str, password: str, timeout: float = 30.0) -> Wire:
    wire = Wire(target.host, target.port, timeout)
    try:
        wire.greeting()
        wire.login(login, password)
    except BaseException:
        wire.close()
        raise
    return wire


def fetch(target, stack, mailbox: str, seconds: float) -> dict:
    """MB/s (10^6 bytes) of ``FETCH 1 BODY.PEEK[]`` repeated over one connection."""
    login = f"{mailbox}@bench.test"
    wire = _logged_in(target, login, stack.users[login])
    try:
        wire.command(b"EXAMINE INBOX")
        size = wire.command(b"FETCH 1 BODY.PEEK[]")     # warm-up, and the message's size
        before = _snapshot(target, stack)
        started = time.perf_counter()
        moved, rounds = 0, 0
        while rounds < MAX_FETCH_ROUNDS and (
                rounds < MIN_FETCH_ROUNDS or time.perf_counter() - started < seconds):
            moved += wire.command(b"FETCH 1 BODY.PEEK[]")
            rounds += 1
        elapsed = time.perf_counter() - started
        after = _snapshot(target, stack)
        wire.logout()
    finally:
        wire.close()
    proxy_cpu = procstats.cpu_used(before["proxy"], after["proxy"])
    return {"message_bytes": size, "rounds": rounds, "seconds": elapsed, "bytes": moved,
            "proxy_cpu_s": proxy_cpu,
            "mb_per_s": moved / elapsed / 1e6,
            "proxy_cpu_ms_per_100mb": proxy_cpu / moved * 1e11 if target.proxy_pgid else None}


def noop(target, stack, count: int) -> dict:
    """Latency of ``count`` sequential NOOPs on one logged-in connection, in µs."""
    login, password = stack.session_users[0]
    wire = _logged_in(target, login, password)
    samples = []
    try:
        for _ in range(NOOP_WARMUP):
            wire.command(b"NOOP")
        clock = time.perf_counter_ns
        for _ in range(count):
            begin = clock()
            wire.command(b"NOOP")
            samples.append(clock() - begin)
        wire.logout()
    finally:
        wire.close()
    samples.sort()
    return {"count": count, "p50_us": _percentile(samples, 50) / 1e3,
            "p90_us": _percentile(samples, 90) / 1e3, "p99_us": _percentile(samples, 99) / 1e3,
            "mean_us": statistics.fmean(samples) / 1e3}


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
    return merged


def pooled_fetch(rounds: list[dict], has_proxy: bool) -> dict:
    """Several ``fetch`` runs of one target merged."""
    merged = dict(rounds[-1])
    moved = sum(r["bytes"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    cpu = sum(r["proxy_cpu_s"] for r in rounds)
    merged.update(bytes=moved, seconds=seconds, mb_per_s=moved / seconds / 1e6,
                  rounds=rounds, proxy_cpu_s=cpu,
                  proxy_cpu_ms_per_100mb=cpu / moved * 1e11 if has_proxy else None)
    return merged
