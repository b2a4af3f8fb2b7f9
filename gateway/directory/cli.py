"""The directory commands of ``python -m gateway``: ``sync export FILE`` and ``lookup LOGIN``.

Each returns the process exit status: 0 done, 1 a problem in the input (bad export line,
unknown login), 2 the directory cache (Redis) unreachable or busy.
"""
from __future__ import annotations

import os
import sys
from typing import TextIO

import redis

from ..config import Config
from . import records
from .cache import Directory, DirectoryUnavailable, connect, redis_url
from .export import ExportError, iter_export
from .sync import SyncBusy, SyncError, full_sync


def cmd_sync_export(config: Config, path: str, out: TextIO = sys.stderr) -> int:
    """Full sync from an export file: a progress line on a terminal, then the summary."""
    label = "sync export"
    client = connect(config)
    try:
        entries = iter_export(path, default_domain=config.directory.default_domain)
        summary = full_sync(client, entries, source="export", config=config, progress=out,
                            origin=os.path.abspath(path), label=label)
    except ExportError as exc:
        print(f"{label}: {exc}", file=out)
        return 1
    except SyncBusy as exc:
        print(f"{label}: {exc}", file=out)
        return 2
    except SyncError as exc:
        print(str(exc), file=out)
        return 1
    except (redis.RedisError, OSError) as exc:
        print(f"{label}: cannot use the directory cache at {redis_url(config)}: "
              f"{_reason(exc)}", file=out)
        return 2
    finally:
        client.close()
    for warning in summary.warnings:
        print(f"{label}: warning: {warning}", file=out)
    print(summary.line(), file=out)
    return 0


def cmd_lookup(config: Config, login: str, out: TextIO = sys.stdout) -> int:
    """Print where a mailbox lives and which sync put it there; 1 when the login is unknown."""
    client = connect(config)
    try:
        try:
            normalized = records.normalize_login(login, config.directory.default_domain)
        except ValueError as exc:
            print(f"lookup: {login!r}: {exc}", file=out)
            return 1
        record = Directory(client, config.directory).lookup(login)
    except DirectoryUnavailable as exc:
        print(f"lookup: directory cache at {redis_url(config)} unavailable: "
              f"{_reason(exc.__cause__ or exc)}", file=out)
        return 2
    finally:
        client.close()
    if record is None:
        print(f"lookup: {login!r} ({normalized}): unknown login", file=out)
        return 1
    backend = config.backends.get(record.backend)
    where = (f"{backend.address}:{backend.imap_port} (imap), :{backend.pop3_port} (pop3), "
             f"tls {backend.tls}" if backend else "(not in this config)")
    for name, value in (("login", login), ("normalized", normalized),
                        ("backend", record.backend), ("address", where),
                        ("backend_login", record.backend_login or "(the login name)"),
                        ("mailbox_id", record.mailbox_id or "-"),
                        ("source", record.source or "-"), ("generation", record.generation)):
        print(f"{name + ':':15}{value}", file=out)
    return 0


def _reason(exc: BaseException) -> str:
    return str(exc) or exc.__class__.__name__
