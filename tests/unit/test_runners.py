"""workers/runners.py: greenlets that serve one connection after another."""
import gevent
import gevent.event

from workers.runners import Runners


def test_a_runner_serves_one_call_after_another():
    runners = Runners()
    seen = []
    runners.spawn(lambda: seen.append(gevent.getcurrent()))
    assert runners.join(5)
    runners.spawn(lambda: seen.append(gevent.getcurrent()))
    assert runners.join(5)
    assert len(seen) == 2 and seen[0] is seen[1]      # the same greenlet, reused
    assert len(runners) == 0 and len(runners.idle) == 1


def test_calls_at_once_get_runners_of_their_own():
    runners = Runners()
    started, release = [], gevent.event.Event()

    def call(n):
        started.append((n, gevent.getcurrent()))
        release.wait(5)

    for n in range(3):
        runners.spawn(call, n)
    gevent.sleep(0)
    assert len(runners) == 3 and len({g for _, g in started}) == 3
    assert not runners.join(0.01)
    release.set()
    assert runners.join(5)
    assert len(runners.idle) == 3


def test_idle_runners_beyond_keep_end():
    runners = Runners(keep=1)
    release = gevent.event.Event()
    for _ in range(3):
        runners.spawn(release.wait, 5)
    gevent.sleep(0)
    release.set()
    assert runners.join(5)
    gevent.sleep(0)
    assert len(runners.idle) == 1 and len(runners.live) == 1


def test_a_failing_call_is_reported_and_the_runner_goes_on(capsys):
    runners = Runners()

    def boom():
        raise ValueError("a bug in one session")
    runners.spawn(boom)
    assert runners.join(5)
    assert len(runners.idle) == 1
    done = []
    runners.spawn(done.append, 1)
    assert runners.join(5) and done == [1]
    assert "a bug in one session" in capsys.readouterr().err


def test_a_late_kill_reaching_an_idle_runner_is_dropped():
    """A kill scheduled for a session that has already ended (gateway.session's hang-up watch
    during a login) reaches the runner idle: it is dropped and the runner serves on."""
    runners = Runners()
    runner = runners.spawn(lambda: None)
    assert runners.join(5)
    runner.kill(RuntimeError("meant for the last session"), block=False)
    gevent.sleep(0)
    assert runners.idle == [runner] and not runner.dead
    done = []
    assert runners.spawn(lambda: done.append(gevent.getcurrent())) is runner
    assert runners.join(5) and done == [runner]


def test_a_late_kill_queued_before_the_next_call_loses_nothing():
    """The order of a race under load: the kill (meant for the session the runner has just
    ended) is queued, then a new connection is handed to the same idle runner before the
    loop runs the kill.  The kill is dropped and the new call is served."""
    runners = Runners()
    runner = runners.spawn(lambda: None)
    assert runners.join(5)
    done = []
    runner.kill(RuntimeError("meant for the last session"), block=False)   # queued first
    assert runners.spawn(done.append, "B") is runner                       # then the call
    assert runners.join(5) and done == ["B"]
    assert not runner.dead and runners.idle == [runner]


def test_kill_ends_busy_and_idle_runners():
    runners = Runners()
    runners.spawn(lambda: None)
    runners.join(5)
    runners.spawn(gevent.sleep, 30)
    gevent.sleep(0)
    runners.kill(block=True, timeout=5)
    assert not runners.live and len(runners) == 0
