"""``python -m gateway status``: is this gateway host serving, and is it healthy?

The master publishes its own state in ``<run_dir>/status.json`` (rewritten every
``[server] status_interval`` seconds, atomically, removed when it stops): its pid, the
worker target and every worker's pid, generation and age.  Why a file and not Redis: the
question "is the master alive" must be answerable when Redis is not, and the file is local
to the host the operator (or the monitoring agent) runs the command on.  Connections and
back-end errors come from the workers' Prometheus multiprocess files under
``<run_dir>/metrics``, Redis and the directory from Redis itself.

Exit status: 0 healthy; 1 degraded (fewer workers than the target, the directory never
synced, or the last sync older than twice ``sync_interval``); 2 down (no master, no worker,
a stale status file, or Redis unreachable).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import TextIO

FILE_NAME = "status.json"
HEALTHY, DEGRADED, DOWN = 0, 1, 2


def status_path(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), FILE_NAME)


class StatusFile:
    """The master's side: ``maybe_write(arbiter, interval)`` once per main-loop pass."""

    def __init__(self, run_dir: str):
        self.path = status_path(run_dir)
        self.last = 0.0
        self.started = time.time()

    def maybe_write(self, arbiter, interval: float) -> None:
        now = time.monotonic()
        if now - self.last < interval:
            return
        self.last = now
        workers = [{"pid": w.pid, "generation": w.generation,
                    "age": round(now - w.started, 1),
                    "retiring": w.retiring_since is not None}
                   for w in arbiter.workers.values()]
        state = {"pid": os.getpid(), "time": time.time(), "started": self.started,
                 "interval": interval, "target": arbiter.target,
                 "generation": arbiter.generation, "workers": workers,
                 # Workers keep dying: the next replacement waits this long (arbiter.crashed).
                 "respawn_in": round(max(0.0, arbiter.respawn_at - now), 1),
                 "recent_exits": len(arbiter.crashes), "exit_window": arbiter.crash_window}
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(temporary, "w") as fh:
                json.dump(state, fh)
            os.replace(temporary, self.path)
        except OSError:
            pass   # a full disk must not stop the master; status then reports a stale file

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _master(run_dir: str) -> tuple[dict | None, str]:
    """The master's state, or None and why it counts as down."""
    try:
        with open(status_path(run_dir)) as fh:
            state = json.load(fh)
    except FileNotFoundError:
        return None, "no status file: the master is not running"
    except (OSError, ValueError) as exc:
        return None, f"status file unreadable: {exc}"
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return None, f"master pid {state['pid']} is gone"
    except PermissionError:
        pass
    age = time.time() - float(state["time"])
    if age > 3 * float(state.get("interval", 2)) + 5:
        return None, f"status file is {age:.0f}s old: the master is stuck"
    return state, ""


def _worker_metrics(run_dir: str) -> dict:
    """{"connections": {(protocol, listener): n}, "backend_errors": {backend: n}}."""
    from gateway.metrics import metrics_dir
    found = {"connections": {}, "backend_errors": {}}
    path = metrics_dir(run_dir)
    if not os.path.isdir(path):
        return found
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "mailgate_connections_current":
                key = (sample.labels["protocol"], sample.labels["listener"])
                found["connections"][key] = int(sample.value)
            elif sample.name == "mailgate_backend_connect_errors_total":
                found["backend_errors"][sample.labels["backend"]] = int(sample.value)
    return found


def cmd_status(config, out: TextIO = sys.stdout) -> int:
    """Print the state of this gateway host; the exit status says healthy, degraded, down."""
    from gateway.directory.cache import connect, describe
    from gateway.metrics import directory_state
    run_dir = config.server.run_dir
    down, degraded = [], []
    state, why = _master(run_dir)
    if state is None:
        down.append(why)
        print(f"master:      DOWN ({why})", file=out)
    else:
        live = [w for w in state["workers"] if not w["retiring"]]
        print(f"master:      pid {state['pid']}, up {time.time() - state['started']:.0f}s, "
              f"{len(live)} of {state['target']} workers", file=out)
        for worker in state["workers"]:
            print(f"  worker     pid {worker['pid']}, age {worker['age']:.0f}s, generation "
                  f"{worker['generation']}{' (retiring)' if worker['retiring'] else ''}",
                  file=out)
        if state.get("respawn_in"):
            print(f"  respawn    in {state['respawn_in']:.0f}s: {state['recent_exits']} workers "
                  f"exited unexpectedly within {state['exit_window']:g}s", file=out)
            degraded.append("workers keep exiting")
        if not live:
            down.append("no worker")
        elif len(live) < state["target"]:
            degraded.append(f"{len(live)} of {state['target']} workers")
    counts = _worker_metrics(run_dir)
    for (protocol, listener), value in sorted(counts["connections"].items()):
        print(f"connections: {protocol} {listener}: {value}", file=out)
    client = connect(config)
    try:
        directory = directory_state(client)
    finally:
        client.close()
    if directory is None:
        down.append("Redis unreachable")
        print(f"redis:       UNREACHABLE ({describe(config)})", file=out)
    else:
        print(f"redis:       reachable ({describe(config)})", file=out)
        _directory_lines(config, directory, degraded, out)
    for backend in sorted(config.backends):
        errors = counts["backend_errors"].get(backend, 0)
        print(f"backend:     {backend}: {errors} connect errors since start", file=out)
    if down:
        print("status:      down: " + "; ".join(down), file=out)
        return DOWN
    if degraded:
        print("status:      degraded: " + "; ".join(degraded), file=out)
        return DEGRADED
    print("status:      healthy", file=out)
    return HEALTHY


def _directory_lines(config, directory: dict, degraded: list, out: TextIO) -> None:
    if directory["generation"] is None:
        degraded.append("directory never synced")
        print("directory:   never synced", file=out)
        return
    age = None if directory["sync_time"] is None else time.time() - directory["sync_time"]
    print(f"directory:   generation {directory['generation']}, last full sync "
          f"{'unknown' if age is None else f'{age:.0f}s ago'}", file=out)
    interval = config.directory.sync_interval
    if interval and age is not None and age > 2 * interval:
        degraded.append(f"last sync {age:.0f}s ago (sync_interval {interval:.0f}s)")
