"""Prometheus metrics: counted in plain per-worker ints, exported through prometheus_client's
multiprocess mode, served as ``/metrics`` by any worker (aggregated over every live and dead
worker of this master).

Why batch: a prometheus_client multiprocess ``inc()`` takes a lock, checks the pid and writes
an mmap'd file (about 1 µs; ``observe()`` about 2 µs), and a session touches about ten of
them.  A session instead adds to the plain ints and lists of one ``Recorder`` (about 0.1 µs
each, see bench/metrics_cost.py) and a greenlet flushes the totals into the multiprocess
files once a second (``FLUSH_INTERVAL``) and when the worker stops.  A worker killed by
SIGKILL loses at most one interval of counts.

Layout: the master calls ``prepare_dir(run_dir)`` before it forks (the folder
``<run_dir>/metrics`` is emptied and ``PROMETHEUS_MULTIPROC_DIR`` set, so every worker
inherits it) and ``worker_exited(pid)`` when it reaps a worker (prometheus_client's
``mark_process_dead``: the live gauges of the dead pid go, its counters stay, so totals never
go down across worker restarts and HUP).  prometheus_client is imported after the
environment variable is set: it picks its value class at import time.
"""
from __future__ import annotations

import bisect
import os
import shutil
import struct
import time
from collections import defaultdict

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
REFUSALS = ("worker", "per-address", "per-login", "throttled")
LOGIN_RESULTS = ("ok", "auth-failed", "unavailable", "protocol", "limit", "throttled")
FLUSH_INTERVAL = 1.0
LOOKUP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


def metrics_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "metrics")


def prepare_dir(run_dir: str) -> str:
    """Master, before the first fork: an empty metrics folder, named in the environment."""
    path = metrics_dir(run_dir)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ[DIR_ENV] = path
    return path


def preload() -> None:
    """Master, after ``prepare_dir``: import prometheus_client once, before the forks (it
    picks its multiprocess value class at import time, and a worker then boots without the
    import's tenth of a second)."""
    import prometheus_client  # noqa: F401
    from prometheus_client import multiprocess  # noqa: F401


def worker_exited(pid: int) -> None:
    """Master, after reaping a worker: drop its live gauges (its counters are kept)."""
    if not os.environ.get(DIR_ENV):
        return
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid)


class _Families:
    """The prometheus_client metric objects (made in the worker, after fork)."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram
        self.connections = Counter("mailgate_connections", "Client connections accepted",
                                   ["protocol", "listener"])
        self.connections_current = Gauge(
            "mailgate_connections_current", "Client connections open now",
            ["protocol", "listener"], multiprocess_mode="livesum")
        self.connections_refused = Counter(
            "mailgate_connections_refused", "Connections or logins refused by a limit",
            ["protocol", "limit"])
        self.logins = Counter("mailgate_logins", "Login attempts by result",
                              ["protocol", "result"])
        self.lookups = Counter("mailgate_lookups", "Directory lookups by result",
                               ["result"])
        self.lookup_seconds = Histogram("mailgate_lookup_seconds", "Directory lookup latency",
                                        buckets=LOOKUP_BUCKETS)
        self.backend_errors = Counter("mailgate_backend_connect_errors",
                                      "Back-end connect failures", ["backend"])
        self.backend_seconds = Histogram(
            "mailgate_backend_connect_seconds",
            "Back-end connect latency (plain TCP: until its greeting)", ["backend"],
            buckets=CONNECT_BUCKETS)
        self.referrals = Counter("mailgate_referrals_followed",
                                 "IMAP referrals followed for a client", ["kind"])
        self.kicked = Counter("mailgate_sessions_kicked",
                              "Sessions closed by a move or a kick", ["reason"])
        self.bytes = Counter("mailgate_relayed_bytes", "Bytes relayed",
                             ["protocol", "direction"])
        self.sessions = Counter("mailgate_sessions_ended", "Sessions ended, by last state",
                                ["protocol", "state"])
        self.tls = Counter("mailgate_tls_handshakes", "TLS handshakes with clients",
                           ["result"])
        self.workers = Gauge("mailgate_workers_alive", "Worker processes alive",
                             multiprocess_mode="livesum")


class Recorder:
    """One worker's counts; every method is a few dictionary or integer operations."""

    def __init__(self):
        self.counts: dict = defaultdict(int)      # (family attribute, labels) → delta
        self.observations: dict = defaultdict(list)  # (family attribute, labels) → seconds
        self.current: dict = defaultdict(int)     # (protocol, listener) → open connections
        self._families: _Families | None = None

    # -- the hot path --------------------------------------------------------------------

    def opened(self, protocol: str, listener: str) -> None:
        key = (protocol, listener)
        self.counts["connections", key] += 1
        self.current[key] += 1

    def closed(self, protocol: str, listener: str, state: str, bytes_in: int,
               bytes_out: int) -> None:
        """A session ended: its connection, last state and bytes in one call."""
        counts = self.counts
        self.current[protocol, listener] -= 1
        counts["sessions", (protocol, state)] += 1
        counts["bytes", (protocol, "in")] += bytes_in
        counts["bytes", (protocol, "out")] += bytes_out

    def login(self, protocol: str, result: str) -> None:
        self.counts["logins", (protocol, result)] += 1

    def refused(self, protocol: str, limit: str) -> None:
        self.counts["connections_refused", (protocol, limit)] += 1

    def lookup(self, result: str, seconds: float) -> None:
        self.counts["lookups", (result,)] += 1
        self.observations["lookup_seconds", ()].append(seconds)

    def backend_connect(self, backend: str, seconds: float | None) -> None:
        """``seconds`` None: the connect failed."""
        if seconds is None:
            self.counts["backend_errors", (backend,)] += 1
        else:
            self.observations["backend_seconds", (backend,)].append(seconds)

    def referral(self, kind: str) -> None:
        self.counts["referrals", (kind,)] += 1

    def kicked(self, reason: str, count: int = 1) -> None:
        self.counts["kicked", (reason,)] += count

    def tls_handshake(self, ok: bool) -> None:
        self.counts["tls", ("ok" if ok else "failed",)] += 1

    # -- off the hot path ----------------------------------------------------------------

    def start_worker(self, protocols=("imap", "pop3")) -> None:
        """In a worker, after fork: create the families and count this worker alive.

        The series dashboards and alerts ask for exist from the start, at 0 (a rate over a
        series that appears only with its first event misses that event).
        """
        if not os.environ.get(DIR_ENV):
            return
        self._families = families = _Families()
        families.workers.set(1)
        for protocol in protocols:
            for limit in REFUSALS:
                families.connections_refused.labels(protocol, limit)
            for result in LOGIN_RESULTS:
                families.logins.labels(protocol, result)
            for direction in ("in", "out"):
                families.bytes.labels(protocol, direction)
        for result in ("hit", "miss", "read-through", "error"):
            families.lookups.labels(result)

    def flush(self) -> None:
        """Move the deltas into the multiprocess files (a no-op outside a served worker)."""
        families = self._families
        if families is None:
            return
        counts, self.counts = self.counts, defaultdict(int)
        observations, self.observations = self.observations, defaultdict(list)
        for (name, labels), amount in counts.items():
            metric = getattr(families, name)
            (metric.labels(*labels) if labels else metric).inc(amount)
        for (name, labels), values in observations.items():
            metric = getattr(families, name)
            _observe_many(metric.labels(*labels) if labels else metric, values)
        for labels, value in self.current.items():
            families.connections_current.labels(*labels).set(value)

    def run_flusher(self, sleep) -> None:
        """Flush every FLUSH_INTERVAL seconds, forever (a worker greenlet)."""
        while True:
            sleep(FLUSH_INTERVAL)
            self.flush()


def _observe_many(histogram, values: list) -> None:
    """``observe()`` each value, in one write per bucket: prometheus_client 0.26's Histogram
    keeps one value per bucket (non-cumulative: the first bound >= the value) and a sum;
    another layout falls back to ``observe()``."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1   # the last bound is +Inf
    histogram._sum.inc(sum(values))
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


recorder = Recorder()


RENDER_ATTEMPTS = 5     # reads of the workers' files per scrape (see render)


def render(directory=None) -> tuple[bytes, str]:
    """The Prometheus text of every worker of this master, plus ``directory`` gauges
    (generation and sync age, read from Redis at scrape time).  Returns (body, content type).
    """
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client import multiprocess
    recorder.flush()
    registry = CollectorRegistry()
    if os.environ.get(DIR_ENV):
        multiprocess.MultiProcessCollector(registry)
    if directory is not None:
        registry.register(_DirectoryCollector(directory))
    for attempt in range(RENDER_ATTEMPTS):
        try:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        except struct.error:
            # A worker starting right now (HUP, TTIN, a replacement) has created its file
            # and not yet sized it: for an instant it is empty and prometheus_client fails
            # to read it.  Read again rather than answer the scrape with an error.
            if attempt == RENDER_ATTEMPTS - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


class _DirectoryCollector:
    """Sync generation and age of the last full sync, from ``mailgate:dir:meta``."""

    def __init__(self, directory):
        self.directory = directory

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        state = directory_state(self.directory.redis)
        up = GaugeMetricFamily("mailgate_redis_up", "Redis answered this scrape")
        up.add_metric([], 1 if state is not None else 0)
        yield up
        if not state:
            return
        if state.get("generation") is not None:
            generation = GaugeMetricFamily("mailgate_directory_generation",
                                           "Live directory generation")
            generation.add_metric([], state["generation"])
            yield generation
        if state.get("sync_time") is not None:
            age = GaugeMetricFamily("mailgate_directory_sync_age_seconds",
                                    "Seconds since the last sync (full or incremental) finished")
            age.add_metric([], max(0.0, time.time() - state["sync_time"]))
            yield age


def directory_state(client) -> dict | None:
    """{"generation", "sync_time"} from Redis (values None when never synced; the time is
    the end of the last full or incremental sync); None when Redis does not answer.  One
    pipeline: for scrapes and ``status``."""
    import redis
    from gateway.directory import records
    try:
        pipe = client.pipeline(transaction=False)
        pipe.get(records.CURRENT_KEY)
        pipe.hget(records.META_KEY, "time")
        pipe.hget(records.LDAP_MARK_KEY, "time")     # the last incremental sync
        generation, full, incremental = pipe.execute()
    except (redis.RedisError, OSError):
        return None
    times = [float(t) for t in (full, incremental) if t is not None]
    return {"generation": int(generation) if generation is not None else None,
            "sync_time": max(times) if times else None}
