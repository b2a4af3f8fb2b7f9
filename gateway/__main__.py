"""The command line: serve, sync, lookup, kick, check-config, status.

``python -m gateway serve --config FILE [--workers N]`` starts the master; the arbiter is
imported lazily so that nothing here pulls in gevent or protocol code.
"""
from __future__ import annotations

import argparse
import sys

from gateway import config as config_mod
from gateway import logs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="mailgate IMAP/POP3 gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the master and its workers in the foreground")
    serve.add_argument("--config", required=True)
    serve.add_argument("--workers", type=int, default=None, help="override server.workers")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("--config", required=True)

    sync = sub.add_parser("sync", help="fill the mailbox cache from the directory")
    sync_sub = sync.add_subparsers(dest="source", required=True)
    export = sync_sub.add_parser("export", help="full sync from a directory export (CSV, LDIF)")
    export.add_argument("file")
    export.add_argument("--config", required=True)
    ldap = sync_sub.add_parser("ldap", help="sync from LDAP / Active Directory")
    ldap.add_argument("--config", required=True)
    ldap.add_argument("--incremental", action="store_true",
                      help="only the entries changed since the last sync")
    refill = sync_sub.add_parser("refill", help="the last full sync again, if the cache is "
                                                "empty or older than it (run by the master)")
    refill.add_argument("--config", required=True)

    lookup = sub.add_parser("lookup", help="where a mailbox lives, and from which source")
    lookup.add_argument("login")
    lookup.add_argument("--config", required=True)

    kick = sub.add_parser("kick", help="close a user's open sessions on every worker")
    kick.add_argument("login")
    kick.add_argument("--config", required=True)

    status = sub.add_parser("status", help="this host's workers, connections, Redis, directory "
                                           "(exit 0 healthy, 1 degraded, 2 down)")
    status.add_argument("--config", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.server.log_level, config.server.log_format)
    if args.command in ("serve", "check-config"):
        from gateway import tls
        try:
            tls.check(config)   # certificates, keys, CA files: one line, never a traceback
        except tls.TlsError as exc:
            print(f"config error: {config.path}: {exc}", file=sys.stderr)
            return 2
    return COMMANDS[args.command](config, args)


def cmd_serve(config, args) -> int:
    if args.workers is not None and args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    from workers import arbiter  # noqa: PLC0415 - the master is loaded only when serving
    return arbiter.serve(config, args.workers)


def cmd_check_config(config, args) -> int:
    listeners = ", ".join(f"{l.protocol}={l.address}" for l in config.listen)
    print(f"{config.path}: OK ({listeners}; {len(config.backends)} back-ends)")
    return 0


def cmd_sync(config, args) -> int:
    from gateway.directory import cli
    if args.source == "ldap":
        return cli.cmd_sync_ldap(config, args.incremental)
    if args.source == "refill":
        return cli.cmd_sync_refill(config)
    return cli.cmd_sync_export(config, args.file)


def cmd_lookup(config, args) -> int:
    from gateway.directory import cli
    return cli.cmd_lookup(config, args.login)


def cmd_kick(config, args) -> int:
    from gateway.directory import cli
    return cli.cmd_kick(config, args.login)


def cmd_status(config, args) -> int:
    from gateway import status
    return status.cmd_status(config)


COMMANDS = {"serve": cmd_serve, "check-config": cmd_check_config, "sync": cmd_sync,
            "lookup": cmd_lookup, "kick": cmd_kick, "status": cmd_status}

if __name__ == "__main__":
    sys.exit(main())
