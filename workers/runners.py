"""Greenlets that serve one connection after another: the design's one greenlet per
connection, without a new greenlet per connection.

gevent's ``Pool`` makes a ``Greenlet`` for every connection, and on CPython 3.11 every new
greenlet also gets its own 16 KiB Python frame stack: an mmap when it starts and a munmap
when it ends, about 13 us and two system calls per login (README, Benchmarks).  A
runner serves a connection to its end (the dialogue and the login; a logged-in session goes
on in the event-loop relay), then waits for the next one.  Up to ``keep`` idle runners are
kept; more are made when more connections arrive at once.

``Runners`` is what a gevent ``StreamServer`` takes as its ``spawn`` callable; the worker
counts (``len``), waits for (``join``) and kills (``kill``) what runs, as it did a pool.
"""
from __future__ import annotations

import sys

import gevent
from gevent import Greenlet, GreenletExit, get_hub
from gevent.event import Event


class Runners:
    """``spawn(func, *args)`` runs ``func(*args)`` in an idle runner, or in a new one."""

    def __init__(self, keep: int = 256):
        self.keep = keep
        self.hub = get_hub()
        self.idle: list[Greenlet] = []
        self.live: set[Greenlet] = set()
        self.busy = 0                  # calls started and not yet returned
        self.empty = Event()           # set while nothing is busy (join)
        self.empty.set()

    def __len__(self) -> int:
        return self.busy

    def spawn(self, func, *args) -> Greenlet:
        if not self.busy:
            self.empty.clear()
        self.busy += 1
        if self.idle:
            runner = self.idle.pop()
            self.hub.loop.run_callback(runner.switch, (func, args))
            return runner
        runner = Greenlet(self._serve, func, args)
        self.live.add(runner)
        runner.start()
        return runner

    def _serve(self, func, args) -> None:
        me = gevent.getcurrent()
        try:
            while True:
                try:
                    func(*args)
                except Exception:  # noqa: BLE001 - reported as gevent reports a greenlet's
                    self.hub.handle_error(me, *sys.exc_info())
                finally:
                    func = args = None
                    self.busy -= 1
                    if not self.busy:
                        self.empty.set()
                if len(self.idle) >= self.keep:
                    return
                self.idle.append(me)
                func, args = self._next()
        finally:
            self.live.discard(me)
            if me in self.idle:
                self.idle.remove(me)

    def _next(self):
        """Wait, idle, for the next call (``spawn`` switches here with it).

        A kill meant for the session this runner has ended (gateway.session's hang-up watch
        during a back-end login, or the routing relay's) can arrive now: it is dropped, and
        the runner goes on waiting.  Its next call may already be on its way: ``spawn`` took
        it off the idle list and scheduled the switch after that kill.  GreenletExit (the
        worker's ``kill``) ends the runner."""
        while True:
            try:
                return self.hub.switch()
            except GreenletExit:
                raise
            except BaseException:   # noqa: BLE001 - see above
                continue

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no call is running (idle runners do not count)."""
        return self.empty.wait(timeout)

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        """Kill every runner, busy or idle."""
        gevent.killall(list(self.live), block=block, timeout=timeout)
