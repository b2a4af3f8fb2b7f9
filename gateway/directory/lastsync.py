"""The last full sync, remembered outside Redis so that a Redis that comes back empty (or
restored from an older snapshot) can be refilled without an operator.

Every successful full sync (``sync export FILE``, ``sync ldap``) writes
``<run_dir>/last-sync.json``: which source, which file, which generation it made.  The master
(workers/services.py ``CacheRefill``) compares that with the live generation in Redis and
re-runs the same sync when the cache is empty or older.  The file holds no secret: an LDAP
sync is re-run from the config, an export from the file's path.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..config import Config
from . import records

STATE_FILE = "last-sync.json"
KINDS = ("export", "ldap")


@dataclass(frozen=True)
class LastSync:
    kind: str              # "export" | "ldap"
    generation: int        # the generation that sync made live
    path: str = ""         # the export file (absolute), for kind "export"

    def argv(self) -> list[str]:
        """The ``python -m gateway`` arguments (before ``--config``) that repeat this sync."""
        if self.kind == "export":
            return ["sync", "export", self.path]
        return ["sync", "ldap"]


def state_path(config: Config) -> str:
    return os.path.join(os.path.abspath(config.server.run_dir), STATE_FILE)


def remember(config: Config, last: LastSync) -> None:
    """Write the state file atomically (a reader sees the old one or the new one)."""
    path = state_path(config)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as fh:
        json.dump(asdict(last), fh)
        fh.write("\n")
    os.replace(temporary, path)


def recall(config: Config) -> LastSync | None:
    """The last full sync on this host, or None (none yet, or an unreadable file)."""
    try:
        with open(state_path(config)) as fh:
            raw = json.load(fh)
        last = LastSync(kind=str(raw["kind"]), generation=int(raw["generation"]),
                        path=str(raw.get("path", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if last.kind not in KINDS or (last.kind == "export" and not last.path):
        return None
    return last


def refill_reason(redis_client, last: LastSync) -> str | None:
    """Why the cache needs the last sync again ("empty", "older"), or None when it does not.

    Redis errors propagate (the caller tries again later): a Redis that is down or still
    loading its snapshot cannot be judged.
    """
    value = redis_client.get(records.CURRENT_KEY)
    if value is None:
        return "the directory cache is empty"
    live = int(value)
    if live < last.generation:
        return f"the live generation {live} is older than the last sync's {last.generation}"
    return None
