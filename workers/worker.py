"""One gevent worker: patched after fork, serves every inherited listening socket.

Imported only in the child process (see arbiter.spawn), so the master stays unpatched.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from workers.runners import Runners  # noqa: E402

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
# A full worker still answers: a client nobody else accepted within this many seconds gets
# the protocol's "too many connections" goodbye from it (never silence in the backlog).
REFUSE_DELAY = 0.2
REFUSE_BATCH = 64


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
            server = StreamServer(listener, self.service.handler(listen))
            server.max_accept = MAX_ACCEPT
            server.is_health = listen.protocol == "health"
            if server.is_health:     # (/healthz answers however many sessions are open)
                server.set_spawn(Pool(config.server.max_connections + REFUSE_BATCH))
            else:
                # The bound that counts is the worker's open sessions (logged-in ones leave
                # their runner for the relay): the server stops accepting while it is full.
                server.runners = Runners()
                server.set_spawn(server.runners.spawn)
                server.full = self.service.full
            self.servers.append(server)
        self.service.room_callbacks.append(self.resume_accepting)

    def start(self) -> None:
        """Boot: signal handlers, then accept on every socket.  A failure here is a boot
        failure (the master stops instead of respawning a worker that can never serve)."""
        gevent.signal_handler(signal.SIGTERM, self.request_stop, True)
        gevent.signal_handler(signal.SIGQUIT, self.request_stop, False)
        # USR1 is the master's graceful stop of the whole gateway (TERM alone retires this
        # worker on HUP/TTOU while others go on serving /healthz with 200).
        gevent.signal_handler(signal.SIGUSR1, self.request_stop, True, True)
        # Ctrl-C reaches the whole foreground group: the master decides, the worker waits
        # for the master's TERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _hold_log_lines()
        for server in self.servers:
            server.start()
            if not server.is_health:
                gevent.spawn(self.refuse_while_full, server)
        # What boot made lives as long as the worker: out of the cycle collector's sight, its
        # full collections stay short (and the pages shared with the master stay shared).
        gc.freeze()

    def resume_accepting(self) -> None:
        """A full worker has room again (gevent only resumes on its pool's semaphore)."""
        for server in self.servers:
            if server.started and not self.stop_event.is_set():
                server.start_accepting()

    def refuse_while_full(self, server: StreamServer) -> None:
        """While the worker is full, answer the clients that wait in the listen backlog with
        the protocol's goodbye: a worker with room takes them first (it is woken at once);
        what is still there after REFUSE_DELAY found every worker full."""
        while server.started:
            gevent.sleep(REFUSE_DELAY)
            for _ in range(REFUSE_BATCH):
                if not self.service.full() or not server.started:
                    break
                try:
                    accepted = server.do_read()
                except OSError:
                    break
                if not accepted:
                    break
                server.do_handle(*accepted)   # a runner: refuses (or serves,
                                              # should a session have ended meanwhile)

    def run(self) -> int:
        """Serve until told to stop; an exception out of here is a crash after boot (the
        master replaces the worker)."""
        beat = gevent.spawn(self.beat)
        flusher = gevent.spawn(self.recorder.run_flusher, gevent.sleep)
        log.info("worker pid=%d serving", os.getpid())
        _crash_hook()
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

        On the gateway's stop the health listener stays open meanwhile, answering 503.  A
        worker retired alone (HUP, TTOU) leaves while others serve: it stops accepting at
        once, and the health requests it already took are answered as usual (200)."""
        self.service.draining = self.announce
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
        pools = [server.runners for server in self.servers if not server.is_health]
        if self.graceful:
            log.info("worker pid=%d draining %d sessions", os.getpid(), self.service.open_sessions())
            deadline = self.config.server.graceful_timeout
            with gevent.Timeout(deadline, False):
                # Logged-in sessions live in the event-loop relay, not in the runners.
                while (self.service.open_sessions() or any(len(p) for p in pools)) \
                        and self.graceful:
                    gevent.sleep(0.1)
        for server in self.servers:
            if server.is_health:
                server.close()     # no new health request from here on ...
        self._answer_health_requests()   # ... and the ones taken get their answer
        self.service.shutdown(graceful=False)
        for server in self.servers:
            server.close()
        with gevent.Timeout(2, False):
            for pool in pools:
                pool.join()
        for pool in pools:
            pool.kill(block=True, timeout=1)

    def _answer_health_requests(self) -> None:
        """Let the health handlers in progress finish (each is bounded by health.TIMEOUT).
        A connection this worker accepted and then closed unanswered would look, to a load
        balancer's check, like a dead instance while the gateway merely reloads."""
        from gateway import health
        with gevent.Timeout(health.TIMEOUT + 1, False):
            for server in self.servers:
                if server.is_health:
                    server.pool.join()


def _hold_log_lines() -> None:
    """Session-end lines wait up to logs.HOLD_SECONDS on a loop timer and go out together
    (gateway.logs: a session costs about 5 % less); main() writes what is left at exit."""
    from gateway import logs
    loop = gevent.get_hub().loop

    def schedule() -> None:
        # A new timer each time: a libev timer started again after it fired fires at once.
        loop.timer(logs.HOLD_SECONDS).start(logs.write_held)
    logs.hold_lines(schedule)


def _crash_hook() -> None:
    """Test hook (no client can make a booted worker raise): once the file named by
    MAILGATE_TEST_CRASH_FILE appears, the first serving worker to remove it raises in its
    main greenlet, as an unexpected bug would."""
    path = os.environ.get("MAILGATE_TEST_CRASH_FILE")
    if not path:
        return
    main_greenlet = gevent.getcurrent()

    def crash_when_asked():
        while True:
            gevent.sleep(0.05)
            try:
                os.unlink(path)
            except OSError:
                continue
            main_greenlet.throw(RuntimeError("test hook: crash after boot"))
    gevent.spawn(crash_when_asked)


def main(config, fds: dict, heartbeat, redis_url: str) -> int:
    """Run a worker in this (freshly forked) process; the return value is the exit status:
    WORKER_BOOT_ERROR when it could not start serving (the master stops), WORKER_CRASHED
    when it failed after that (the master replaces it)."""
    from gateway import logs
    from workers.arbiter import WORKER_BOOT_ERROR, WORKER_CRASHED
    logs.setup(config.server.log_level, config.server.log_format)
    try:
        worker = Worker(config, fds, heartbeat, redis_url)
        worker.start()
    except Exception:
        log.exception("worker pid=%d cannot start", os.getpid())
        return WORKER_BOOT_ERROR
    try:
        return worker.run()
    except Exception:  # noqa: BLE001 - reported, and the master replaces this worker
        log.exception("worker pid=%d crashed after boot", os.getpid())
        return WORKER_CRASHED
    finally:
        logs.write_held()
