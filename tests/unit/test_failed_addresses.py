"""Which client addresses a worker checks in Redis before a login (throttling without
connection limits): those with failures heard of, and every one while it cannot hear."""
from __future__ import annotations

from gateway.directory import records
from gateway.limits import FailedAddresses


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_clean_until_watching_and_after_the_subscription_is_lost():
    failed = FailedAddresses(300)
    assert not failed.clean("192.0.2.1")
    failed.watch(["192.0.2.9"])
    assert failed.clean("192.0.2.1")
    assert not failed.clean("192.0.2.9")        # failures Redis counted before
    failed.unwatch()
    assert not failed.clean("192.0.2.1")


def test_a_failure_marks_its_address_for_the_window():
    clock = Clock()
    failed = FailedAddresses(300, clock=clock)
    failed.watch(())
    failed.mark("192.0.2.1")
    assert not failed.clean("192.0.2.1") and failed.clean("192.0.2.2")
    clock.now += 299
    failed.mark("192.0.2.1")                     # a later failure starts the window again
    clock.now += 299
    assert not failed.clean("192.0.2.1")
    clock.now += 2
    assert failed.clean("192.0.2.1")


def test_too_many_marked_addresses_means_checking_all_for_a_window():
    clock = Clock()
    failed = FailedAddresses(300, size=3, clock=clock)
    failed.watch(())
    for n in range(4):
        failed.mark(f"192.0.2.{n}")
    assert not failed.clean("198.51.100.1")
    assert not failed.clean("192.0.2.3")
    clock.now += 301
    assert failed.clean("198.51.100.1") and failed.clean("192.0.2.3")


def test_the_failure_message_names_the_address_and_is_no_close_message():
    data = records.failed_message("192.0.2.1")
    assert records.parse_failed_message(data) == "192.0.2.1"
    assert records.parse_failed_message(records.changed_message(3)) is None
    assert not records.is_changed_message(data)
    try:
        records.parse_close_message(data)
    except ValueError:
        pass
    else:
        raise AssertionError("a failure message closed sessions")
