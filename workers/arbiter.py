"""The master: binds sockets, forks and supervises workers, handles signals.

Modelled on gunicorn's arbiter: a signal handler only queues the signal and wakes the main
loop through a pipe; the loop dispatches ``handle_<signame>`` by name and ends every pass with
"reap dead workers, kill hung ones, bring the count to the target".  The master never imports
gevent or protocol code: the worker module is imported in the child, after fork.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from gateway import config as config_mod
from gateway import metrics
from gateway import status as status_mod
from gateway import tls
from workers.probe import BackendProbe
from workers.services import CacheRefill, EmbeddedRedis, ServiceError, SyncJob
from workers.sockets import BindError, SocketSet

log = logging.getLogger("mailgate.master")

WORKER_BOOT_ERROR = 3     # the worker never served: stop rather than respawn for ever
WORKER_CRASHED = 4        # the worker served, then failed: replace it like a killed one
BOOT_MODE = 0o600         # a heartbeat file's mode until the worker's first beat (0 or 1)
# Workers that keep dying (a bug some client triggers, memory running out): after
# CRASH_BURST unexpected exits within CRASH_WINDOW seconds, a replacement waits, 1 s at first,
# twice as long after each further exit, at most CRASH_MAX_DELAY; a quiet CRASH_WINDOW, or a
# HUP, ends the backoff.  (Dovecot throttles a failing service the same way; a worker that
# cannot boot at all stops the master instead.)
CRASH_BURST = 5
CRASH_WINDOW = 10.0
CRASH_MAX_DELAY = 30.0
SIGNALS = ("HUP", "QUIT", "INT", "TERM", "TTIN", "TTOU", "CHLD")


class HaltServer(Exception):
    def __init__(self, reason: str, exit_status: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


@dataclass
class WorkerRecord:
    pid: int
    generation: int
    heartbeat: object            # an unlinked temp file; the worker changes its ctime
    started: float = field(default_factory=time.monotonic)
    retiring_since: float | None = None

    def last_beat(self) -> float:
        """Seconds since the worker last touched its heartbeat file."""
        return time.time() - os.fstat(self.heartbeat.fileno()).st_ctime

    def serving(self) -> bool:
        """The worker has beaten once: its listeners accept (it beats after starting them)."""
        return os.fstat(self.heartbeat.fileno()).st_mode & 0o777 != BOOT_MODE


class Arbiter:
    """One master process: ``Arbiter(config, workers).run()`` returns the exit status."""

    crash_window = CRASH_WINDOW      # (for the status file)

    def __init__(self, config: config_mod.Config, workers: int | None = None):
        self.config = config
        self.workers_override = workers
        self.target = workers or config.server.worker_count
        self.generation = 0
        self.workers: dict[int, WorkerRecord] = {}
        self.sockets = SocketSet()
        self.redis: EmbeddedRedis | None = None
        self.redis_url = config.redis.url
        self.sync_job: SyncJob | None = None
        self.refill: CacheRefill | None = None
        self.signal_queue: list[str] = []
        self.pipe: tuple[int, int] | None = None
        self.stopping = False
        self.status = None
        self.probe: BackendProbe | None = None
        self.replaced: list[WorkerRecord] = []   # retired once their successors serve
        self.replaced_since = 0.0
        self.crashes: list[float] = []   # monotonic times of unexpected worker exits
        self.respawn_delay = 0.0         # the current backoff (0: none)
        self.respawn_at = 0.0            # no worker is replaced before this time

    # -- start and main loop ---------------------------------------------------------------

    def run(self) -> int:
        try:
            self.start()
        except (BindError, ServiceError, tls.TlsError) as exc:
            log.error("%s", exc)
            self.cleanup()
            return 2
        try:
            self.spawn_missing()
            self.status.maybe_write(self, 0)     # "status" works from the first second
            # After the first workers: a slow resolver cannot hold the start up.
            if self.config.server.probe_backends:
                self.probe = BackendProbe(self.config)   # polled by step()
            while True:
                self.step()
        except StopIteration:
            return 0
        except HaltServer as halt:
            log.error("stopping: %s", halt.reason)
            self.stop(graceful=False)
            return halt.exit_status
        except KeyboardInterrupt:
            self.stop(graceful=False)
            return 0
        finally:
            self.cleanup()

    def start(self) -> None:
        # Signals are queued from the first moment: a TERM that arrives while Redis or the
        # metrics start is handled by the main loop, not by Python's default (death).
        self.pipe = os.pipe()
        for fd in self.pipe:
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self.queue_signal)
        # The pidfile next: once a port answers, its pid is on disk (cleanup() removes it
        # again when a bind fails).
        if self.config.server.pidfile:
            with open(self.config.server.pidfile, "w") as fh:
                fh.write(f"{os.getpid()}\n")
        tls.preload(self.config)   # TlsError: one line, exit 2 (run() catches it)
        self.sockets.ensure([l.host_port for l in self.config.listen])
        # After binding (a second master on the same run_dir fails before touching the
        # first's files) and before any fork: workers inherit the folder in the environment.
        metrics.prepare_dir(self.config.server.run_dir)
        metrics.preload()
        self.status = status_mod.StatusFile(self.config.server.run_dir)
        if not self.config.redis.url and not self.config.redis.sentinels:
            self.redis = EmbeddedRedis(self.config.server.run_dir)
            self.redis.start()
            self.redis_url = f"unix://{self.redis.socket_path}"
        self.sync_job = SyncJob.for_config(self.config)
        self.refill = CacheRefill(self.config)
        addresses = ", ".join(f"{l.protocol}={l.address}" for l in self.config.listen)
        log.info("master pid=%d listening %s, %d workers", os.getpid(), addresses, self.target)

    def queue_signal(self, signum, frame) -> None:
        if len(self.signal_queue) < 10:
            self.signal_queue.append(signal.Signals(signum).name[3:])
        self.wakeup()

    def wakeup(self) -> None:
        try:
            os.write(self.pipe[1], b".")
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def sleep(self, seconds: float) -> None:
        try:
            ready = select.select([self.pipe[0]], [], [], seconds)
            if ready[0]:
                while os.read(self.pipe[0], 64):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

    def step(self) -> None:
        """One pass: handle a queued signal (or sleep), then reap, murder, manage."""
        name = self.signal_queue.pop(0) if self.signal_queue else None
        if name is None:
            self.sleep(0.1 if self.replaced else 1.0)
        else:
            getattr(self, f"handle_{name.lower()}")()
        self.reap_workers()
        self.murder_workers()
        self.spawn_missing()
        self.retire_replaced()
        if self.probe is not None:
            self.probe.poll()
            if self.probe.done:
                self.probe = None
        if self.sync_job and not self.stopping:
            self.sync_job.tick()
        if self.refill and not self.stopping:
            self.refill.tick()
        self.status.maybe_write(self, self.config.server.status_interval)

    # -- signals ---------------------------------------------------------------------------

    def handle_chld(self) -> None:
        """Reaping happens at the end of every pass."""

    def handle_term(self) -> None:
        log.info("TERM: graceful stop (timeout %ss)", self.config.server.graceful_timeout)
        self.stop(graceful=True)
        raise StopIteration

    handle_int = handle_term

    def handle_quit(self) -> None:
        log.info("QUIT: fast stop")
        self.stop(graceful=False)
        raise StopIteration

    def handle_ttin(self) -> None:
        self.target += 1
        log.info("TTIN: %d workers", self.target)

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.target -= 1
        log.info("TTOU: %d workers", self.target)

    def handle_hup(self) -> None:
        """Reload: new config, new workers first, then the old ones retire gracefully."""
        try:
            fresh = config_mod.load(self.config.path)
            tls.check(fresh)
            tls.preload(fresh)   # new workers get the new certificates; old sessions keep theirs
            self.sockets.ensure([l.host_port for l in fresh.listen])
        except (config_mod.ConfigError, BindError, tls.TlsError) as exc:
            log.error("HUP: new config rejected, keeping the running one: %s", exc)
            return
        self.config = fresh
        self.sync_job = SyncJob.for_config(fresh, self.sync_job)
        if self.refill:
            self.refill.reconfigure(fresh)
        if not self.workers_override:
            self.target = fresh.server.worker_count
        old = [w for w in self.workers.values() if w.retiring_since is None]
        self.end_backoff()            # a new config may be the fix: start at once
        self.generation += 1
        log.info("HUP: config reloaded; starting generation %d", self.generation)
        self.spawn_missing()
        if not self.replaced:
            self.replaced_since = time.monotonic()
        self.replaced.extend(old)

    def retire_replaced(self) -> None:
        """Retire the workers a reload replaced once every new worker serves (or after
        heartbeat_timeout).  Until then the old ones go on accepting: retired at once, they
        would leave new clients waiting in the listen queue while the new workers boot."""
        if not self.replaced:
            return
        booting = [w for w in self.current() if not w.serving()]
        waited = time.monotonic() - self.replaced_since
        if booting and waited < self.config.server.heartbeat_timeout:
            return
        for worker in self.replaced:
            if worker.pid in self.workers:
                self.retire(worker)
        self.replaced = []

    # -- workers -----------------------------------------------------------------------------

    def current(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values()
                if w.retiring_since is None and w.generation == self.generation]

    def spawn_missing(self) -> None:
        if self.stopping:
            return
        current = sorted(self.current(), key=lambda w: w.started)
        while len(current) > self.target:
            self.retire(current.pop(0))
        if len(current) < self.target and time.monotonic() < self.respawn_at:
            return            # backing off: workers keep dying (crashed())
        for _ in range(self.target - len(current)):
            self.spawn()

    def crashed(self) -> None:
        """A worker exited unexpectedly: past CRASH_BURST such exits within CRASH_WINDOW,
        its replacement waits (see CRASH_BURST)."""
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW] + [now]
        if len(self.crashes) < CRASH_BURST:
            self.respawn_delay = 0.0
            return
        self.respawn_delay = min(max(self.respawn_delay * 2, 1.0), CRASH_MAX_DELAY)
        self.respawn_at = now + self.respawn_delay
        log.error("%d workers exited within %gs: the next one starts in %gs", len(self.crashes),
                  CRASH_WINDOW, self.respawn_delay)

    def end_backoff(self) -> None:
        self.crashes = []
        self.respawn_delay = self.respawn_at = 0.0

    def spawn(self) -> None:
        heartbeat = tempfile.TemporaryFile(prefix="mailgate-wbeat-")
        os.fchmod(heartbeat.fileno(), BOOT_MODE)
        pid = os.fork()
        if pid:
            self.workers[pid] = WorkerRecord(pid, self.generation, heartbeat)
            log.info("worker pid=%d started (generation %d)", pid, self.generation)
            return
        status = 0
        try:
            for name in SIGNALS:
                signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            if self.probe is not None:
                self.probe.close()     # the child's copies of the master's probe sockets
            from workers import worker  # gevent is imported here, in the child only
            status = worker.main(self.config, self.sockets.fds(), heartbeat, self.redis_url)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a child must never return into the master loop
            # worker.main sorts boot failures from crashes; what escapes it (the import of
            # the worker module, gevent's patching) happened before the first accept.
            log.exception("worker pid=%d failed", os.getpid())
            status = WORKER_BOOT_ERROR
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def retire(self, worker: WorkerRecord) -> None:
        if worker.retiring_since is None:
            worker.retiring_since = time.monotonic()
            self.kill(worker.pid, signal.SIGTERM)

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            if self.redis and self.redis.reap(pid):
                if self.refill:
                    self.refill.soon()
                continue
            if self.refill and self.refill.reap(pid, status):
                continue
            if self.sync_job and self.sync_job.reap(pid, status):
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            worker.heartbeat.close()
            metrics.worker_exited(pid)    # its live gauges go; its counters stay
            code = os.waitstatus_to_exitcode(status)
            if code == WORKER_BOOT_ERROR:
                raise HaltServer(f"worker pid={pid} failed to boot; see the lines above", 3)
            if worker.retiring_since is None and not self.stopping:
                log.warning("worker pid=%d %s (%s); replacing it", pid,
                            "crashed" if code == WORKER_CRASHED else "died", _describe(code))
                self.crashed()
            else:
                log.info("worker pid=%d exited", pid)

    def murder_workers(self) -> None:
        """Kill workers that stopped beating or overstayed their retirement."""
        timeout = self.config.server.heartbeat_timeout
        grace = self.config.server.graceful_timeout + 5
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.last_beat() > timeout:
                log.error("worker pid=%d missed its heartbeat for %ss; killing it",
                          worker.pid, timeout)
                self.kill(worker.pid, signal.SIGKILL)
            elif worker.retiring_since is not None and now - worker.retiring_since > grace:
                log.warning("worker pid=%d still draining after %ss; killing it", worker.pid, grace)
                self.kill(worker.pid, signal.SIGKILL)

    # -- stop ------------------------------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        """Stop every worker (TERM = drain, QUIT = now) and wait for them."""
        self.stopping = True
        # USR1: drain like TERM and tell the load balancer (/healthz 503) meanwhile.
        sig = signal.SIGUSR1 if graceful else signal.SIGQUIT
        for worker in self.workers.values():
            self.kill(worker.pid, sig)
        server = self.config.server
        limit = (server.graceful_timeout + server.drain_delay if graceful else 0) + 5
        deadline = time.monotonic() + limit
        while self.workers and time.monotonic() < deadline:
            self.reap_workers_quietly()
            self.sleep(0.1)
        for worker in self.workers.values():
            self.kill(worker.pid, signal.SIGKILL)
        while self.workers:
            self.reap_workers_quietly()
            if self.workers:
                time.sleep(0.05)

    def reap_workers_quietly(self) -> None:
        try:
            self.reap_workers()
        except HaltServer:
            pass

    def cleanup(self) -> None:
        if getattr(self, "status", None) is not None:
            self.status.remove()
        if self.probe is not None:
            self.probe.close()
        if self.sync_job:
            self.sync_job.stop()
        if self.refill:
            self.refill.stop()
        if self.redis:
            self.redis.stop()
        self.sockets.close()
        pidfile = self.config.server.pidfile
        if pidfile and os.path.exists(pidfile):
            try:
                with open(pidfile) as fh:
                    if fh.read().strip() == str(os.getpid()):
                        os.unlink(pidfile)
            except OSError:
                pass


def _describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def serve(config: config_mod.Config, workers: int | None = None) -> int:
    """Entry point of ``python -m gateway serve``."""
    return Arbiter(config, workers).run()
