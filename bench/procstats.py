"""CPU time and memory of a set of processes, read from /proc (Linux only)."""
from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_group(pgid: int) -> list[int]:
    """Live processes of a process group (a server started in its own session)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: fields[0] is the state (field 3 in proc(5))."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pids) -> dict[int, float]:
    """utime + stime of each live process plus cutime + cstime of its reaped children, in
    seconds (proc(5) fields 14 to 17): a child that lived and died between two snapshots
    (a back-end's short-lived mail process) is counted in its parent."""
    times = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            times[pid] = sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
    return times


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots; a process born in between counts whole."""
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


def _kib_field(path: str, name: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kib(pids) -> dict[str, int]:
    """Summed Pss (shared pages split between sharers) and VmRSS of the processes, in KiB.

    Pss is the honest total for a pre-forked server: a worker's copy-on-write pages shared
    with its master are counted once, not once per process as RSS counts them.
    """
    pss = sum(_kib_field(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
    rss = sum(_kib_field(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
    return {"pss_kib": pss, "rss_kib": rss}
