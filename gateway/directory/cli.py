"""The directory commands of ``python -m gateway``: ``sync export FILE``, ``sync ldap``,
``lookup LOGIN`` and ``kick LOGIN``.

Each returns the process exit status: 0 done, 1 a problem in the input (bad export line,
unknown login, no LDAP source configured), 2 the directory cache (Redis) or the directory
server unreachable, or another sync running.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import TextIO

import redis

from ..config import Config
from . import lastsync, records
from .lastsync import LastSync
from .records import MailboxRecord
from .cache import Directory, DirectoryUnavailable, connect, describe
from .export import ExportError, iter_export
from .sync import SyncBusy, SyncError, SyncNotNeeded, full_sync


def cmd_sync_export(config: Config, path: str, out: TextIO = sys.stderr,
                    precondition=None) -> int:
    """Full sync from an export file: a progress line on a terminal, then the summary."""
    def run(client):
        entries = iter_export(path, config.directory)
        return full_sync(client, entries, source="export", config=config, progress=out,
                         origin=os.path.abspath(path), label="sync export",
                         precondition=precondition)
    last = LastSync("export", 0, os.path.abspath(path))
    return _run_sync(config, "sync export", run, out, remember_as=last)


def cmd_sync_ldap(config: Config, incremental: bool = False, out: TextIO = sys.stderr,
                  precondition=None) -> int:
    """Full or incremental sync from LDAP / Active Directory (``[directory] ldap_*``)."""
    if config.directory.source != "ldap" or not config.directory.ldap_url:
        print(f"sync ldap: {config.path}: directory.source is not \"ldap\"", file=out)
        return 1
    from .ldap_sync import full_ldap_sync, incremental_ldap_sync
    if incremental:
        # (an incremental sync also stands for a full one: it falls back to one when the
        # cache has no usable high-water mark, and it keeps the generation otherwise)
        return _run_sync(config, "sync ldap --incremental",
                         lambda client: incremental_ldap_sync(client, config, out), out,
                         remember_as=LastSync("ldap", 0))
    return _run_sync(config, "sync ldap",
                     lambda client: full_ldap_sync(client, config, out, precondition=precondition),
                     out, remember_as=LastSync("ldap", 0))


def cmd_sync_refill(config: Config, out: TextIO = sys.stderr) -> int:
    """The master's refill: the last full sync recorded in run_dir, run again only if the
    cache (looked at under the sync lock) is empty or older than that sync."""
    last = lastsync.recall(config)
    if last is None:
        print(f"sync refill: no full sync recorded in {lastsync.state_path(config)}", file=out)
        return 1

    def stale(client) -> str | None:
        return lastsync.refill_reason(client, last)
    if last.kind == "export":
        return cmd_sync_export(config, last.path, out, precondition=stale)
    return cmd_sync_ldap(config, False, out, precondition=stale)


def _run_sync(config: Config, label: str, run, out: TextIO,
              remember_as: LastSync | None = None) -> int:
    """Run a sync, print its warnings and summary; the exit status (see the module doc)."""
    from .ldap import LdapError   # noqa: PLC0415 - ldap3 is loaded by sync jobs only
    client = connect(config)
    try:
        summary = run(client)
    except (ExportError, LdapError) as exc:
        print(f"{label}: {exc}", file=out)
        return 1 if isinstance(exc, ExportError) else 2
    except SyncNotNeeded as exc:
        print(str(exc), file=out)
        return 0
    except SyncBusy as exc:
        print(f"{label}: {exc}", file=out)
        return 2
    except SyncError as exc:
        print(str(exc), file=out)
        return 1
    except (redis.RedisError, OSError) as exc:
        print(f"{label}: cannot use the directory cache at {describe(config)}: "
              f"{_reason(exc)}", file=out)
        return 2
    finally:
        client.close()
    for warning in summary.warnings:
        print(f"{label}: warning: {warning}", file=out)
    print(summary.line(), file=out)
    if remember_as is not None:
        _remember(config, dataclasses.replace(remember_as, generation=summary.generation), out)
    return 0


def _remember(config: Config, last: LastSync, out: TextIO) -> None:
    """Keep the sync for the master's refill (see lastsync.py); a failure is a warning only:
    the sync itself worked."""
    try:
        lastsync.remember(config, last)
    except OSError as exc:
        print(f"warning: cannot write {lastsync.state_path(config)}: {exc.strerror}; a Redis "
              f"that comes back empty will not be refilled by the master", file=out)


def cmd_kick(config: Config, login: str, out: TextIO = sys.stdout) -> int:
    """Close the sessions of a login name (and of its mailbox) on every worker of every
    gateway host sharing the Redis: prints how many workers got the message."""
    try:
        normalized = records.normalize_login(login, config.directory.default_domain)
    except ValueError as exc:
        print(f"kick: {login!r}: {exc}", file=out)
        return 1
    client = connect(config)
    try:
        mailbox_id = _mailbox_id(client, normalized)
        receivers = client.publish(records.KICK_CHANNEL,
                                   records.kick_message(normalized, mailbox_id))
    except (redis.RedisError, OSError) as exc:
        print(f"kick: cannot use the directory cache at {describe(config)}: {_reason(exc)}",
              file=out)
        return 2
    finally:
        client.close()
    print(f"kick: {normalized}: sent to {receivers} workers", file=out)
    return 0


def _mailbox_id(client, normalized: str) -> str:
    """The mailbox id of a login name in the live generation ("" if none): the workers then
    also close sessions opened under the mailbox's other login names."""
    generation = client.get(records.CURRENT_KEY)
    if generation is None:
        return ""
    packed = client.hget(records.generation_key(generation), normalized)
    try:
        return MailboxRecord.unpack(packed).mailbox_id if packed else ""
    except ValueError:
        return ""


def cmd_lookup(config: Config, login: str, out: TextIO = sys.stdout) -> int:
    """Print where a mailbox lives and which sync put it there; 1 when the login is unknown."""
    client = connect(config)
    try:
        try:
            normalized = records.normalize_login(login, config.directory.default_domain)
        except ValueError as exc:
            print(f"lookup: {login!r}: {exc}", file=out)
            return 1
        record = Directory.for_config(client, config).lookup(login)
    except DirectoryUnavailable as exc:
        print(f"lookup: directory cache at {describe(config)} unavailable: "
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
