"""The bench's table on stdout and its JSON file."""
from __future__ import annotations

import json
from pathlib import Path

TARGETS = ("direct", "mailgate", "nginx")

# The goals for mailgate, checked against the same run's nginx figures.
NOOP_SLACK_US = 10.0
IDLE_KIB_LIMIT = 12.0


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
    ("IMAP sessions/s (LOGIN+LOGOUT)", "sessions", "sessions_per_s", ".0f", "ratio"),
    ("  session latency p50, ms", "sessions", "session_ms_p50", ".2f", None),
    ("  CPU per session, proxy, us", "sessions", "proxy_cpu_us_per_session", ".0f", None),
    ("  CPU per session, lookup helper, us", "sessions", "helper_cpu_us_per_session", ".0f", None),
    ("  CPU per session, Dovecot, us", "sessions", "dovecot_cpu_us_per_session", ".0f", None),
    ("  load generator, busy cores", "sessions", "loadgen_cores", ".2f", None),
    ("  failed sessions", "sessions", "errors", "d", None),
    ("10 MiB FETCH, MB/s", "fetch10", "mb_per_s", ".0f", "ratio"),
    ("  proxy CPU, ms per 100 MB", "fetch10", "proxy_cpu_ms_per_100mb", ".1f", None),
    ("20 MB FETCH, MB/s", "fetch20", "mb_per_s", ".0f", "ratio"),
    ("NOOP latency p50, us (+ over direct)", "noop", "p50_us", ".1f", "plus"),
    ("NOOP latency p99, us", "noop", "p99_us", ".1f", None),
    ("idle logged-in conn, KiB Pss each", "memory", "pss_kib_per_conn", ".2f", None),
    ("idle logged-in conn, KiB RSS each", "memory", "rss_kib_per_conn", ".2f", None),
    ("  idle connections opened / alive", "memory", "opened_alive", "s", None),
]


def table(results: dict) -> str:
    """The figures of one run as a fixed-width text table."""
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


def goals(results: dict) -> list[str]:
    """The issue's targets for mailgate against this run's nginx, one line each."""
    checks = []

    def check(name, ok, detail):
        if ok is not None:
            checks.append(f"{'met   ' if ok else 'MISSED'} {name}: {detail}")

    for phase, what in (("sessions", "sessions/s"), ("fetch10", "10 MiB FETCH")):
        key = "sessions_per_s" if phase == "sessions" else "mb_per_s"
        mine, theirs = _ratio(results, phase, "mailgate", key), _ratio(results, phase, "nginx", key)
        if mine is not None and theirs is not None:
            check(f"{what} ratio to direct above nginx's", mine > theirs,
                  f"mailgate {mine:.2f} vs nginx {theirs:.2f}")
    kib = _get(results, "memory", "mailgate", "pss_kib_per_conn")
    if kib is not None:
        check(f"idle connection <= {IDLE_KIB_LIMIT:g} KiB", kib <= IDLE_KIB_LIMIT,
              f"mailgate {kib:.2f} KiB (Pss)")
    direct = _get(results, "noop", "direct", "p50_us")
    mine = _get(results, "noop", "mailgate", "p50_us")
    theirs = _get(results, "noop", "nginx", "p50_us")
    if None not in (direct, mine, theirs):
        check(f"NOOP p50 overhead within {NOOP_SLACK_US:g} us of nginx's",
              mine - direct <= theirs - direct + NOOP_SLACK_US,
              f"mailgate +{mine - direct:.1f} us vs nginx +{theirs - direct:.1f} us")
    return checks


def render(results: dict) -> str:
    meta = results["meta"]
    head = [f"mailgate bench, {meta['started']}  ({meta['status']})",
            f"command: {meta['command']}",
            f"host: {meta['cpus']} CPUs, Python {meta['python']}, Dovecot {meta['dovecot']}, "
            f"nginx {meta['nginx']}; all on loopback, one Dovecot behind every target",
            f"setup: {meta['setup']}", ""]
    foot = ["", "MB = 10^6 bytes; (N.NNx) = ratio to direct in this run; CPU is utime+stime "
            "from /proc; the lookup helper is Redis for mailgate, auth_http for nginx."]
    checks = goals(results)
    if checks:
        foot += ["", "goals (from the issue, against this run's nginx):"]
        foot += [f"  {c}" for c in checks]
    return "\n".join(head + [table(results)] + foot)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
