"""``python -m bench.smtp``: messages per second through mailgate's submission front end,
next to the same client sending straight to the back-end's submission service.

One Dovecot (submission relaying to a private Postfix that delivers into Dovecot's Maildirs),
Redis and the gateway are started in a temporary folder and stopped at the end.  Two ways to
send, each over ``--connections`` parallel client threads, ``--messages`` messages in all:

* ``session``: connect, EHLO, AUTH, one message, QUIT (the gateway's login path counts);
* ``stream``:  one AUTH per connection, then messages back to back (the relay alone).

A message is counted when its DATA got 250, i.e. Dovecot has relayed it to Postfix's queue.
Postfix needs root (its master drops privileges): run as root.
"""
from __future__ import annotations

import argparse
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

import servers  # tests/servers.py (on sys.path, see bench/__init__.py)
from mta import Postfix

BACKEND = "bench"


def users(count: int) -> dict[str, str]:
    return {f"user{i}@example.com": f"secret-{i}" for i in range(count)}


def message(index: int, size: int) -> bytes:
    head = (f"From: bench@example.com\r\nTo: user0@example.com\r\n"
            f"Subject: bench {index}\r\nMessage-ID: <bench-{index}-{time.time_ns()}@bench>\r\n"
            f"\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def send(host: str, port: int, logins: list, count: int, size: int, mode: str,
         errors: list) -> None:
    """One client thread: ``count`` messages, a session each or one session for all."""
    def session(login, password):
        client = smtplib.SMTP(host, port, timeout=60)
        client.ehlo("bench.example")
        client.login(login, password)
        return client

    login, password = logins[0]
    client = None
    try:
        for index in range(count):
            if client is None:
                client = session(login, password)
            client.sendmail(login, ["user0@example.com"], message(index, size))
            if mode == "session":
                client.quit()
                client = None
        if client is not None:
            client.quit()
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


def measure(host: str, port: int, accounts: dict, options, mode: str) -> dict:
    """Messages/s over ``options.connections`` threads; each thread its own user."""
    logins = list(accounts.items())
    per_thread = [options.messages // options.connections] * options.connections
    per_thread[0] += options.messages - sum(per_thread)
    errors: list[str] = []
    threads = [threading.Thread(target=send, args=(host, port, [logins[i % len(logins)]],
                                                   per_thread[i], options.size, mode, errors))
               for i in range(options.connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    sent = options.messages - (len(errors) and options.messages)  # any error: the run is void
    return {"mode": mode, "messages": options.messages, "seconds": elapsed,
            "per_second": sent / elapsed if elapsed else 0.0, "errors": errors[:3]}


def run(options) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-smtp-"))
    started = []
    try:
        accounts = users(max(options.connections, 1))
        mta_port = servers.free_port()
        dovecot = servers.Dovecot(tmp / "dovecot", "bench", accounts,
                                  submission_relay=(servers.LOOPBACK, mta_port))
        started.append(dovecot.start())
        mta = Postfix(tmp / "postfix", {u: dovecot.maildir(u) for u in accounts},
                      dovecot.mail_uid, dovecot.mail_gid, port=mta_port)
        started.append(mta.start())
        redis = servers.RedisServer(tmp / "redis")
        started.append(redis.start())
        gateway = servers.GatewayProcess(
            tmp / "gateway", redis_url=redis.url, workers=options.workers,
            protocols=("submission",), server_overrides={"log_level": "info"},
            backends={BACKEND: {"address": dovecot.host, "imap_port": dovecot.imap_port,
                                "pop3_port": dovecot.pop3_port,
                                "submission_port": dovecot.submission_port}})
        started.append(gateway.start())
        gateway.route({login: BACKEND for login in accounts})
        results = []
        for mode in options.modes:
            for name, port in (("direct", dovecot.submission_port),
                               ("mailgate", gateway.submission_port)):
                result = measure(servers.LOOPBACK, port, accounts, options, mode)
                result["target"] = name
                results.append(result)
                print(f"{mode:8} {name:9} {result['messages']:5d} messages "
                      f"{result['seconds']:7.2f} s {result['per_second']:8.1f} msg/s"
                      + (f"  ERRORS {result['errors']}" if result["errors"] else ""),
                      flush=True)
        return results
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--size", type=int, default=2000, help="bytes per message")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers")
    parser.add_argument("--modes", default="session,stream")
    options = parser.parse_args(argv)
    options.modes = [m for m in options.modes.split(",") if m in ("session", "stream")]
    if not Postfix.usable():
        print("bench.smtp needs root and postfix (Dovecot relays to a private Postfix)",
              file=sys.stderr)
        return 2
    results = run(options)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
