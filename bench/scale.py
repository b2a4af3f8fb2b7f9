"""``python -m bench.scale``: 30,000 idle IMAP sessions (logged in, INBOX selected, in IDLE)
through mailgate with 4 workers: the time to establish them and the gateway's memory per
connection.  Not part of ``python -m bench`` (it takes minutes and most of the machine).

Every process here may hold at most 20,000 descriptors (a hard limit), so:
- the clients are several processes (``--client-processes``), each an asyncio loop holding
  its share, each from its own loopback address (127.0.0.N) so that no single source address
  runs out of ephemeral ports (about 28,000 per source and destination);
- Dovecot serves many IDLE clients per imap process (``service imap { client_limit }``) and
  listens on two loopback addresses, behind two [backends] entries, for the same reason on
  the gateway's side;
- the gateway's workers take at most ``--per-worker`` sessions each (two descriptors each).

Run: ``.venv/bin/python -m bench.scale [--sessions 30000] [--workers 4]``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import servers  # tests/servers.py (on sys.path, see bench/__init__.py)

from bench import procstats
from bench.imapwire import quote

SECOND_ADDRESS = "127.0.0.2"
IN_FLIGHT = 32              # logins under way per client process
LINE_LIMIT = 1 << 16
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "scale.json"


def dovecot_tuning(sessions: int) -> str:
    return f"""\
default_process_limit = 200
default_client_limit = 10000
protocol imap {{
  mail_max_userip_connections = {sessions * 2}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1, {SECOND_ADDRESS}
  }}
  service_count = 0
  process_min_avail = 4
  client_limit = 2000
}}
service imap {{
  service_count = 0
  client_limit = 1000
  process_limit = {sessions // 1000 + 20}
}}
"""


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--sessions", type=int, default=30000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--client-processes", type=int, default=6)
    parser.add_argument("--per-worker", type=int, default=9000,
                        help="[server] max_connections (each session holds two descriptors)")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return parser.parse_args(argv)


async def _line(reader) -> bytes:
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed by the server")
    return line


async def _until_tagged(reader, tag: bytes) -> bytes:
    while True:
        line = await _line(reader)
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise ConnectionError(line[:100].decode(errors="replace"))
            return line


async def _idle_session(host, port, source, login, password, gate):
    """Connect, LOGIN, SELECT INBOX, IDLE; returns the open (reader, writer)."""
    async with gate:
        for attempt in range(20):
            writer = None
            try:
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(source, 0), limit=LINE_LIMIT)
                greeting = await _line(reader)
                if not greeting.startswith(b"* OK"):
                    raise ConnectionError(greeting[:80].decode(errors="replace"))
                writer.write(b"a LOGIN " + quote(login) + b" " + quote(password) + b"\r\n")
                await _until_tagged(reader, b"a")
                writer.write(b"b SELECT INBOX\r\n")
                await _until_tagged(reader, b"b")
                writer.write(b"c IDLE\r\n")
                while not (await _line(reader)).startswith(b"+"):
                    pass
                return reader, writer
            except (OSError, ConnectionError, asyncio.IncompleteReadError):
                if writer is not None:
                    writer.close()
                await asyncio.sleep(0.2 * (attempt + 1))     # full worker, busy machine
        raise ConnectionError(f"{login}: no IDLE session after 20 attempts")


async def _client_main(job, conn) -> None:
    host, port_by_user, source, credentials = job
    gate = asyncio.Semaphore(IN_FLIGHT)
    started = time.monotonic()
    results = await asyncio.gather(*(
        _idle_session(host, port_by_user[login], source, login, password, gate)
        for login, password in credentials), return_exceptions=True)
    sessions = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    conn.send({"opened": len(sessions), "failed": len(failures),
               "first_error": repr(failures[0]) if failures else "",
               "seconds": time.monotonic() - started})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)   # the parent measured
    alive = sum(not reader.at_eof() for reader, _ in sessions)
    for _, writer in sessions:
        writer.close()
    conn.send({"alive": alive})


def _client_process(job, conn) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    asyncio.run(_client_main(job, conn))


def run(options) -> dict:
    users = {f"user{i}@bench.test": f"secret-{i}" for i in range(options.users)}
    tmpdir = Path(tempfile.mkdtemp(prefix="mailgate-scale-"))
    try:
        with servers.Dovecot(tmpdir / "dovecot", "scale", users,
                             extra_conf=dovecot_tuning(options.sessions)) as dovecot:
            (tmpdir / "redis").mkdir()
            (tmpdir / "gateway").mkdir()
            with servers.RedisServer(tmpdir / "redis") as redis_server:
                backends = {"one": (dovecot.host, dovecot.imap_port, dovecot.pop3_port),
                            "two": (SECOND_ADDRESS, dovecot.imap_port, dovecot.pop3_port)}
                gateway = servers.GatewayProcess(
                    tmpdir / "gateway", backends=backends, redis_url=redis_server.url,
                    workers=options.workers, protocols=("imap",),
                    server_overrides={"log_level": "warning",
                                      "max_connections": options.per_worker})
                with gateway:
                    gateway.route({login: ("one", "two")[i % 2]
                                   for i, login in enumerate(users)})
                    return measure(options, users, gateway, redis_server)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def measure(options, users, gateway, redis_server) -> dict:
    time.sleep(1.0)
    gateway_pids = procstats.process_group(gateway.pid)
    before = procstats.memory_kib(gateway_pids)
    credentials = list(users.items())
    share = -(-options.sessions // options.client_processes)
    context = multiprocessing.get_context("fork")
    clients = []
    started = time.monotonic()
    for number in range(options.client_processes):
        count = min(share, options.sessions - number * share)
        mine = [credentials[(number * share + i) % len(credentials)] for i in range(count)]
        parent, child = context.Pipe()
        job = (gateway.host, {login: gateway.imap_port for login in users},
               f"127.0.0.{10 + number}", mine)
        process = context.Process(target=_client_process, args=(job, child), daemon=True)
        process.start()
        clients.append((process, parent))
    opened = [parent.recv() for _, parent in clients]
    established = time.monotonic() - started
    time.sleep(2.0)
    after = procstats.memory_kib(procstats.process_group(gateway.pid))
    redis_memory = procstats.memory_kib([redis_server.pid])
    for _, parent in clients:
        parent.send("close")
    alive = sum(parent.recv()["alive"] for _, parent in clients)
    for process, _ in clients:
        process.join(30)
    total = sum(o["opened"] for o in opened)
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "sessions_wanted": options.sessions, "opened": total, "alive_after": alive,
        "failed": sum(o["failed"] for o in opened),
        "first_error": next((o["first_error"] for o in opened if o["first_error"]), ""),
        "workers": options.workers, "client_processes": options.client_processes,
        "seconds_to_establish": established,
        "sessions_per_s_establishing": total / established if established else None,
        "pss_before_kib": before["pss_kib"], "pss_after_kib": after["pss_kib"],
        "rss_after_kib": after["rss_kib"],
        "pss_kib_per_conn": (after["pss_kib"] - before["pss_kib"]) / total if total else None,
        "redis_rss_kib": redis_memory["rss_kib"],
    }


def main(argv=None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    results = run(options)
    print(f"{results['opened']:,} of {results['sessions_wanted']:,} IDLE sessions through "
          f"{results['workers']} workers in {results['seconds_to_establish']:.1f} s "
          f"({results['sessions_per_s_establishing']:.0f}/s); {results['alive_after']:,} "
          f"still open at the end; {results['failed']} failed {results['first_error']}")
    print(f"gateway memory (Pss, master + workers): {results['pss_before_kib'] / 1024:.1f} MiB "
          f"before, {results['pss_after_kib'] / 1024:.1f} MiB after: "
          f"{results['pss_kib_per_conn']:.2f} KiB per connection")
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"JSON: {options.json}")
    return 0 if results["opened"] == results["sessions_wanted"] else 1


if __name__ == "__main__":
    sys.exit(main())
