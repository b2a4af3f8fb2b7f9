"""Redis with replication and a Sentinel, for the failover tests: a primary, a replica and
``redis-sentinel`` watching them, on free loopback ports in a temporary folder."""
from __future__ import annotations

import time

import servers

SERVICE = "mailgate"


class RedisNode(servers.RedisServer):
    """A redis-server (as servers.RedisServer), optionally a replica of ``primary_port``."""

    def __init__(self, tmpdir, primary_port: int | None = None):
        super().__init__(tmpdir)
        self.primary_port = primary_port

    def start(self) -> "RedisNode":
        binary = servers.find_binary("redis-server")
        self.port = servers.free_port()
        lines = [f"port {self.port}", f"bind {self.host}", f"dir {self.tmpdir}", 'save ""',
                 "appendonly no", "daemonize no", "databases 16",
                 f"logfile {self.tmpdir / 'redis.log'}"]
        if self.primary_port:
            lines += [f"replicaof {self.host} {self.primary_port}", "replica-serve-stale-data yes"]
        conf = self.tmpdir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._spawn([binary, str(conf)], self.tmpdir / "redis.stdout")
        servers.wait_for_port(self.host, self.port, 10, self.process)
        return self

    def replication(self) -> dict:
        with self.client() as client:
            return client.info("replication")


class SentinelProcess(servers._Process):
    """One redis-sentinel monitoring ``primary_port`` as SERVICE (quorum 1, fast timers)."""

    name = "sentinel"

    def __init__(self, tmpdir, primary_port: int):
        super().__init__(tmpdir)
        self.host = servers.LOOPBACK
        self.port = 0
        self.primary_port = primary_port

    def start(self) -> "SentinelProcess":
        binary = servers.find_binary("redis-sentinel")
        self.port = servers.free_port()
        conf = self.tmpdir / "sentinel.conf"      # Sentinel rewrites it: a file of its own
        conf.write_text("\n".join([
            f"port {self.port}", f"bind {self.host}", f"dir {self.tmpdir}", "daemonize no",
            f"logfile {self.tmpdir / 'sentinel.log'}",
            f"sentinel monitor {SERVICE} {self.host} {self.primary_port} 1",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 5000",
            f"sentinel parallel-syncs {SERVICE} 1", ""]))
        self._spawn([binary, str(conf)], self.tmpdir / "sentinel.stdout")
        servers.wait_for_port(self.host, self.port, 10, self.process)
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def primary(self) -> tuple[str, int] | None:
        import redis
        with redis.Redis(host=self.host, port=self.port, socket_timeout=5) as client:
            answer = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return (answer[0].decode(), int(answer[1])) if answer else None

    def log_text(self) -> str:
        path = self.tmpdir / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_replicas(self, count: int, timeout: float = 20.0) -> bool:
        """True once the Sentinel knows ``count`` replicas of SERVICE."""
        import redis
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with redis.Redis(host=self.host, port=self.port, socket_timeout=5) as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
            if len(replicas) >= count:
                return True
            time.sleep(0.2)
        return False
