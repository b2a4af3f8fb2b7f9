"""The bench's table on stdout and its JSON file."""
from __future__ import annotations

import json
from pathlib import Path

TARGETS = ("direct", "mailgate", "nginx")

# The goals for mailgate, checked against the same run's nginx figures.
NOOP_SLACK_US = 10.0
IDLE_KIB_LIMIT = 12.0
CPU_LIMIT_US = 450.0
SYSCALL_LIMIT = 40
FETCH_RATIO = 0.75


def _get(results, phase, target, key):
    value = results.get(phase, {}).get(target, {})
    return value.get(key) if isinstance(value, dict) else None


def _ratio(results, phase, target, key):
    mine, direct = _get(results, phase, target, key), _get(results, phase, "direct", key)
    if mine is None or not direct or target == "direct":
        return None
    return mine / direct


def _cell(value, fmt, ratio=None, plus=None) -> str:
    if value is None:
        return "-"
    text = format(value, fmt)
    if ratio is not None:
        text += f" ({ratio:.2f}x)"
    if plus is not None:
        text += f" ({plus:+.0f})"
    return text


ROWS = [
    # label, phase, key, format, extra: "ratio" to direct, "plus" over direct
    ("IMAP sessions/s (LOGIN SELECT FETCH LOGOUT)", "imap", "sessions_per_s", ".0f", "ratio"),
    ("  CPU per session, proxy+helper, us", "imap", "total_cpu_us_per_session", ".0f", None),
    ("  CPU per session, proxy, us", "imap", "proxy_cpu_us_per_session", ".0f", None),
    ("  CPU per session, lookup helper, us", "imap", "helper_cpu_us_per_session", ".0f", None),
    ("  CPU per session, Dovecot, us", "imap", "dovecot_cpu_us_per_session", ".0f", None),
    ("  session latency p50, ms", "imap", "session_ms_p50", ".2f", None),
    ("  load generator, busy cores", "imap", "loadgen_cores", ".2f", None),
    ("  failed sessions", "imap", "errors", "d", None),
    ("POP3 sessions/s (USER PASS STAT QUIT)", "pop3", "sessions_per_s", ".0f", "ratio"),
    ("  CPU per session, proxy+helper, us", "pop3", "total_cpu_us_per_session", ".0f", None),
    ("  CPU per session, proxy, us", "pop3", "proxy_cpu_us_per_session", ".0f", None),
    ("  CPU per session, Dovecot, us", "pop3", "dovecot_cpu_us_per_session", ".0f", None),
    ("  failed sessions", "pop3", "errors", "d", None),
    ("IMAP syscalls per session (strace)", "syscalls_imap", "per_session", ".1f", None),
    ("POP3 syscalls per session (strace)", "syscalls_pop3", "per_session", ".1f", None),
    ("  IMAP syscalls, 1 worker", "syscalls_1_worker_imap", "per_session", ".1f", None),
    ("  POP3 syscalls, 1 worker", "syscalls_1_worker_pop3", "per_session", ".1f", None),
    ("10 MiB FETCH x4 conns, MB/s", "fetch10", "mb_per_s", ".0f", "ratio"),
    ("  proxy CPU, ms per 100 MB", "fetch10", "proxy_cpu_ms_per_100mb", ".1f", None),
    ("NOOP latency p50, us (+ over direct)", "noop", "p50_us", ".1f", "plus"),
    ("NOOP latency p99, us (+ over direct)", "noop", "p99_us", ".1f", "plus"),
    ("idle logged-in conn, KiB Pss each", "memory", "pss_kib_per_conn", ".2f", None),
    ("idle logged-in conn, KiB RSS each", "memory", "rss_kib_per_conn", ".2f", None),
    ("  idle connections opened / alive", "memory", "opened_alive", "s", None),
]

# The spread of repeated rounds: (label, phase, key, format).
SPREAD_ROWS = [
    ("IMAP sessions/s", "imap", "sessions_per_s", ".0f"),
    ("IMAP CPU us/session (proxy+helper)", "imap", "total_cpu_us_per_session", ".0f"),
    ("POP3 sessions/s", "pop3", "sessions_per_s", ".0f"),
    ("POP3 CPU us/session (proxy+helper)", "pop3", "total_cpu_us_per_session", ".0f"),
    ("10 MiB FETCH x4, MB/s", "fetch10", "mb_per_s", ".0f"),
    ("NOOP p50, us", "noop", "p50_us", ".1f"),
    ("NOOP p99, us", "noop", "p99_us", ".1f"),
]


def _flatten(results: dict) -> dict:
    """``syscalls`` → phases ``syscalls_imap`` and ``syscalls_pop3`` for the table (and
    ``syscalls_1_worker`` → ``syscalls_1_worker_imap`` ...)."""
    flat = dict(results)
    for phase in ("syscalls", "syscalls_1_worker"):
        for protocol, by_target in results.get(phase, {}).items():
            flat[f"{phase}_{protocol}"] = by_target
    return flat


def table(results: dict) -> str:
    """The figures of one run as a fixed-width text table."""
    results = _flatten(results)
    targets = [t for t in TARGETS if t in results["meta"]["targets"]]
    for target in targets:
        memory = results.get("memory", {}).get(target)
        if memory:
            memory["opened_alive"] = f"{memory['connections']}/{memory['alive_after']}"
    width = max(len(r[0]) for r in ROWS) + 2
    lines = [f"{'':<{width}}" + "".join(f"{t:>20}" for t in targets)]
    for label, phase, key, fmt, extra in ROWS:
        if phase not in results:
            continue
        cells = []
        for target in targets:
            value = _get(results, phase, target, key)
            ratio = _ratio(results, phase, target, key) if extra == "ratio" else None
            plus = None
            direct = _get(results, phase, "direct", key)
            if extra == "plus" and target != "direct" and value is not None and direct:
                plus = value - direct
            cells.append(_cell(value, fmt, ratio, plus))
        lines.append(f"{label:<{width}}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def spread_table(results: dict) -> str:
    """Each repeated figure, round by round (min..max), so the noise is visible."""
    targets = [t for t in TARGETS if t in results["meta"]["targets"]]
    lines = []
    for label, phase, key, fmt in SPREAD_ROWS:
        cells = []
        for target in targets:
            values = [v for v in (_get(results, phase, target, "spread") or {}).get(key, [])
                      if v is not None]
            cells.append("/".join(format(v, fmt) for v in values) if values else "-")
        if any(c != "-" for c in cells):
            lines.append(f"{label:<36}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def workers_table(results: dict) -> str:
    """Sessions/s and the ratio to direct (same run, same worker count) per worker count."""
    lines = []
    for workers, by_protocol in sorted(results.get("workers", {}).items(), key=lambda i: int(i[0])):
        for protocol, by_target in by_protocol.items():
            direct = (by_target.get("direct") or {}).get("sessions_per_s")
            cells = []
            for target in ("direct", "mailgate", "nginx"):
                rate = (by_target.get(target) or {}).get("sessions_per_s")
                cpu = (by_target.get(target) or {}).get("total_cpu_us_per_session")
                if rate is None:
                    continue
                text = f"{target} {rate:.0f}/s"
                if target != "direct" and direct:
                    text += f" ({rate / direct:.2f}x"
                    text += f", {cpu:.0f} us)" if cpu is not None else ")"
                cells.append(text)
            lines.append(f"  {workers} worker(s) {protocol.upper():<5} " + ";  ".join(cells))
    return "\n".join(lines)


def top_syscalls(results: dict) -> str:
    lines = []
    for protocol, by_target in results.get("syscalls", {}).items():
        for target, found in by_target.items():
            top = found.get("top_per_session") or {}
            if top:
                lines.append(f"  {protocol} {target}: " + ", ".join(
                    f"{name} {count:g}" for name, count in top.items()))
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """The issue's targets for mailgate against this run's nginx, one line each."""
    checks = []

    def check(name, ok, detail):
        if ok is not None:
            checks.append(f"{'met   ' if ok else 'MISSED'} {name}: {detail}")

    for workers, by_protocol in sorted(results.get("workers", {}).items()):
        for protocol, by_target in by_protocol.items():
            sub = {"meta": results["meta"], protocol: by_target}
            mine = _ratio(sub, protocol, "mailgate", "sessions_per_s")
            theirs = _ratio(sub, protocol, "nginx", "sessions_per_s")
            if mine is not None and theirs is not None:
                check(f"{protocol.upper()} sessions/s ratio at or above nginx's, {workers} "
                      f"worker(s)", mine >= theirs, f"mailgate {mine:.2f} vs nginx {theirs:.2f}")
            cpu = _get(sub, protocol, "mailgate", "total_cpu_us_per_session")
            if cpu is not None:
                check(f"{protocol.upper()} CPU per session <= {CPU_LIMIT_US:g} us, {workers} "
                      f"worker(s)", cpu <= CPU_LIMIT_US,
                      f"mailgate {cpu:.0f} us (master+workers+Redis)")
    workers = results["meta"].get("options", {}).get("main_workers")
    for phase, count in (("syscalls_1_worker", 1), ("syscalls", workers)):
        for protocol in ("imap", "pop3"):
            calls = (results.get(phase, {}).get(protocol, {}).get("mailgate") or {}) \
                .get("per_session")
            if calls is not None:
                check(f"{protocol.upper()} syscalls per session <= {SYSCALL_LIMIT}, {count} "
                      f"worker(s)", calls <= SYSCALL_LIMIT, f"mailgate {calls:.1f}")
    fetch = _ratio(results, "fetch10", "mailgate", "mb_per_s")
    if fetch is not None:
        check(f"10 MiB FETCH x4 >= {FETCH_RATIO:g} of direct", fetch >= FETCH_RATIO,
              f"mailgate {fetch:.2f}")
    kib = _get(results, "memory", "mailgate", "pss_kib_per_conn")
    if kib is not None:
        check(f"idle connection <= {IDLE_KIB_LIMIT:g} KiB", kib <= IDLE_KIB_LIMIT,
              f"mailgate {kib:.2f} KiB (Pss)")
    for key in ("p50_us", "p99_us"):
        direct = _get(results, "noop", "direct", key)
        mine = _get(results, "noop", "mailgate", key)
        theirs = _get(results, "noop", "nginx", key)
        if None not in (direct, mine, theirs):
            check(f"NOOP {key[:3]} overhead within {NOOP_SLACK_US:g} us of nginx's",
                  mine - direct <= theirs - direct + NOOP_SLACK_US,
                  f"mailgate {mine - direct:+.1f} us vs nginx {theirs - direct:+.1f} us")
    return checks


def render(results: dict) -> str:
    meta = results["meta"]
    head = [f"mailgate bench, {meta['started']}  ({meta['status']})",
            f"command: {meta['command']}",
            f"host: {meta['cpus']} CPUs, Python {meta['python']}, Dovecot {meta['dovecot']}, "
            f"nginx {meta['nginx']}; all on loopback, one Dovecot behind every target",
            f"setup: {meta['setup']}", ""]
    foot = ["", "MB = 10^6 bytes; (N.NNx) = ratio to direct in this run; CPU is utime+stime "
            "from /proc; the lookup helper is Redis for mailgate, auth_http for nginx;",
            "syscalls: strace -c -f on the proxy's processes (Dovecot's for direct) during a "
            "window of sessions."]
    workers = workers_table(results)
    if workers:
        foot += ["", "sessions/s by worker count (ratio to direct, CPU per session "
                     "proxy+helper):", workers]
    spread = spread_table(results)
    if spread:
        foot += ["", "spread, round by round:", spread]
    top = top_syscalls(results)
    if top:
        foot += ["", "top system calls per session:", top]
    checks = goals(results)
    if checks:
        foot += ["", "goals (from the issue, against this run's nginx):"]
        foot += [f"  {c}" for c in checks]
    return "\n".join(head + [table(results)] + foot)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
