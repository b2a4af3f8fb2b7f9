"""The bench's ratios drawn as one PNG (matplotlib, Agg: no display needed)."""
from __future__ import annotations

from pathlib import Path

PROXIES = ("mailgate", "nginx")
COLOURS = {"mailgate": "#1f77b4", "nginx": "#2ca02c"}


def _ratio(by_target: dict, target: str, key: str):
    mine = (by_target.get(target) or {}).get(key)
    direct = (by_target.get("direct") or {}).get(key)
    return mine / direct if mine is not None and direct else None


def draw(results: dict, path: Path) -> bool:
    """Sessions/s ratio to direct per worker count and protocol, FETCH ratio, CPU per
    session; returns False when the run has nothing to draw."""
    workers = results.get("workers") or {}
    if not workers and "fetch10" not in results:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(12, 3.8),
                                                 gridspec_kw={"width_ratios": [3, 1.2, 1.6]})
    groups = [(w, p) for w in sorted(workers, key=int) for p in workers[w]]
    width = 0.38
    for offset, target in enumerate(PROXIES):
        values = [_ratio(workers[w][p], target, "sessions_per_s") or 0 for w, p in groups]
        left.bar([i + (offset - 0.5) * width for i in range(len(groups))], values, width,
                 label=target, color=COLOURS[target])
    left.set_xticks(range(len(groups)), [f"{p.upper()}\n{w} w" for w, p in groups])
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_title("sessions/s, ratio to direct")
    left.set_ylim(0, 1.25)
    left.legend(loc="upper right", ncol=2, fontsize="small")
    fetch = results.get("fetch10") or {}
    values = [_ratio(fetch, t, "mb_per_s") or 0 for t in PROXIES]
    middle.bar(PROXIES, values, color=[COLOURS[t] for t in PROXIES])
    middle.axhline(0.75, color="red", linewidth=0.8, linestyle="--")
    middle.set_title("10 MiB FETCH x4, ratio")
    for index, protocol in enumerate(("imap", "pop3")):
        cpu = [(results.get(protocol, {}).get(t) or {}).get("total_cpu_us_per_session") or 0
               for t in PROXIES]
        right.bar([index + (o - 0.5) * width for o in range(2)], cpu, width,
                  color=[COLOURS[t] for t in PROXIES])
    right.set_xticks(range(2), ["IMAP", "POP3"])
    right.axhline(450, color="red", linewidth=0.8, linestyle="--")
    right.set_title("CPU µs per session\n(proxy + lookup helper)")
    meta = results.get("meta", {})
    figure.suptitle(f"mailgate bench {meta.get('started', '')}, {meta.get('cpus')} CPUs "
                    f"(shared, noisy machine)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    plt.close(figure)
    return True
