"""One gevent worker: patched after fork, serves every inherited listening socket.

Imported only in the child process (see arbiter.spawn), so the master stays unpatched.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

log = logging.getLogger("mailgate.worker")

def _sendall_in_one_send() -> None:
    """gevent's ``socket.sendall`` asks the kernel for SO_SNDBUF before every write (to size
    its chunks for PyPy); nearly every write here is a short protocol line that one send()
    takes whole.  Try that send first and leave the rest, if any, to gevent's loop.  Only
    for gevent's plain socket class: its TLS subclasses reuse sendall and must go through
    their own send()."""
    from gevent import socket as gevent_socket
    plain = gevent_socket.socket
    gevent_sendall = plain.sendall

    def sendall(self, data, flags=0):
        if type(self) is plain:
            try:
                sent = self._sock.send(data, flags)
            except BlockingIOError:
                sent = 0
            if sent == (len(data) if type(data) is bytes else memoryview(data).nbytes):
                return None
            data = memoryview(data).cast("B")[sent:]
        return gevent_sendall(self, data, flags)

    plain.sendall = sendall


_sendall_in_one_send()

# Several processes accept from one socket: take few connections per wake-up so that the
# kernel's wake-ups spread new clients across workers (gevent's default is 100).
MAX_ACCEPT = 1


class Worker:
    """Serves the inherited sockets until TERM (drain) or QUIT (now)."""

    def __init__(self, config, fds: dict, heartbeat, redis_url: str):
        self.config = config
        self.heartbeat = heartbeat
        self.master_pid = os.getppid()
        self.stop_event = Event()
        self.graceful = True
        from gateway.metrics import recorder
        recorder.start_worker(sorted({l.protocol for l in config.listen} - {"health"}))
        self.recorder = recorder
        self.announce = False      # the whole gateway stops: /healthz says 503 while draining
        from gateway.service import Service  # protocol code: in the worker only
        self.service = Service(config, redis_url)
        self.servers: list[StreamServer] = []
        for listen in config.listen:
            fd = fds[listen.host_port]
            listener = socket.socket(fileno=os.dup(fd))
            listener.setblocking(False)
            pool = Pool(config.server.max_connections)
            server = StreamServer(listener, self.service.handler(listen), spawn=pool)
            server.max_accept = MAX_ACCEPT
            server.is_health = listen.protocol == "health"
            self.servers.append(server)

    def run(self) -> int:
        gevent.signal_handler(signal.SIGTERM, self.request_stop, True)
        gevent.signal_handler(signal.SIGQUIT, self.request_stop, False)
        # USR1 is the master's graceful stop of the whole gateway (TERM alone retires this
        # worker on HUP/TTOU while others go on serving /healthz with 200).
        gevent.signal_handler(signal.SIGUSR1, self.request_stop, True, True)
        # Ctrl-C reaches the whole foreground group: the master decides, the worker waits
        # for the master's TERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for server in self.servers:
            server.start()
        beat = gevent.spawn(self.beat)
        flusher = gevent.spawn(self.recorder.run_flusher, gevent.sleep)
        log.info("worker pid=%d serving", os.getpid())
        self.stop_event.wait()
        self.drain()
        beat.kill()
        flusher.kill()
        self.recorder.flush()     # the last counts of this worker reach /metrics
        return 0

    def request_stop(self, graceful: bool, announce: bool = False) -> None:
        self.graceful = self.graceful and graceful
        self.announce = self.announce or announce
        if self.stop_event.is_set() and not graceful:
            self.service.shutdown(graceful=False)
        self.stop_event.set()

    def beat(self) -> None:
        """Change the heartbeat file's ctime; the master kills a worker that stops."""
        interval = max(self.config.server.heartbeat_timeout / 4, 0.1)
        state = 0
        while True:
            state ^= 1
            os.fchmod(self.heartbeat.fileno(), state)
            if os.getppid() != self.master_pid:
                log.error("master pid=%d is gone; stopping", self.master_pid)
                self.graceful = False
                self.stop_event.set()
                return
            gevent.sleep(interval)

    def drain(self) -> None:
        """Stop accepting; let sessions finish (graceful) or say goodbye now.

        On the gateway's stop the health listener stays open meanwhile, answering 503."""
        self.service.draining = True
        keep = self.announce and self.graceful
        if keep and self.config.server.drain_delay:
            # Health says 503 now; new clients are still served until the balancer has
            # noticed, so none of them meets a listener that no longer accepts.
            log.info("worker pid=%d: /healthz says draining; accepting %ss more",
                     os.getpid(), self.config.server.drain_delay)
            with gevent.Timeout(self.config.server.drain_delay, False):
                while self.graceful:
                    gevent.sleep(0.1)
        for server in self.servers:
            if not (keep and server.is_health):
                server.close()
        pools = [server.pool for server in self.servers if not server.is_health]
        if self.graceful:
            log.info("worker pid=%d draining %d sessions", os.getpid(), self.service.open_sessions())
            deadline = self.config.server.graceful_timeout
            with gevent.Timeout(deadline, False):
                # Logged-in sessions live in the event-loop relay, not in the pools.
                while (self.service.open_sessions() or any(len(p) for p in pools)) \
                        and self.graceful:
                    gevent.sleep(0.1)
        self.service.shutdown(graceful=False)
        for server in self.servers:
            server.close()
        with gevent.Timeout(2, False):
            for pool in pools:
                pool.join()
        for pool in pools:
            pool.kill(block=True, timeout=1)


def main(config, fds: dict, heartbeat, redis_url: str) -> int:
    """Run a worker in this (freshly forked) process; the return value is the exit status."""
    from gateway import logs
    logs.setup(config.server.log_level, config.server.log_format)
    try:
        worker = Worker(config, fds, heartbeat, redis_url)
    except Exception:
        log.exception("worker pid=%d cannot start", os.getpid())
        from workers.arbiter import WORKER_BOOT_ERROR
        return WORKER_BOOT_ERROR
    return worker.run()
