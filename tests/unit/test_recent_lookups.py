"""The worker's cache of recent lookups: what it keeps, what forgets it, and the lookup that
was in flight when a move arrived."""
from __future__ import annotations

from gateway.directory.cache import RecentLookups
from gateway.directory.records import MailboxRecord

ALICE_A = MailboxRecord("A", "", "id-alice", "export", 1)
ALICE_B = MailboxRecord("B", "", "id-alice", "export", 2)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def subscribed_cache(**kwargs) -> RecentLookups:
    recent = RecentLookups(**kwargs)
    recent.subscribed(True)
    return recent


def test_nothing_is_kept_until_the_moves_subscription_is_up():
    recent = RecentLookups()
    recent.put("alice@example.com", ALICE_A, recent.epoch)
    assert recent.get("alice@example.com") is None
    recent.subscribed(True)
    recent.put("alice@example.com", ALICE_A, recent.epoch)
    assert recent.get("alice@example.com") == ALICE_A


def test_losing_the_subscription_forgets_everything_and_keeps_nothing():
    recent = subscribed_cache()
    recent.put("alice@example.com", ALICE_A, recent.epoch)
    recent.subscribed(False)
    assert recent.get("alice@example.com") is None
    recent.put("alice@example.com", ALICE_A, recent.epoch)
    assert recent.get("alice@example.com") is None


def test_a_move_forgets_the_login_name_and_every_name_of_the_mailbox():
    recent = subscribed_cache()
    for name in ("alice@example.com", "a.smith@example.com", "bob@example.com"):
        record = ALICE_A if name != "bob@example.com" else MailboxRecord("A", "", "id-bob")
        recent.put(name, record, recent.epoch)
    recent.forget({"alice@example.com"}, {"id-alice"})
    assert recent.get("alice@example.com") is None
    assert recent.get("a.smith@example.com") is None
    assert recent.get("bob@example.com") is not None


def test_a_generation_switch_forgets_everything():
    recent = subscribed_cache()
    recent.put("alice@example.com", ALICE_A, recent.epoch)
    recent.forget()
    assert recent.get("alice@example.com") is None


def test_a_lookup_in_flight_during_a_move_does_not_store_the_old_answer():
    recent = subscribed_cache()
    began = recent.epoch                      # the lookup asks Redis ...
    recent.forget({"alice@example.com"}, {"id-alice"})   # ... the move arrives meanwhile
    recent.put("alice@example.com", ALICE_A, began)      # ... the old answer comes back
    assert recent.get("alice@example.com") is None
    recent.put("alice@example.com", ALICE_B, recent.epoch)   # the next lookup's answer
    assert recent.get("alice@example.com") == ALICE_B


def test_answers_expire_and_a_full_cache_starts_over():
    clock = Clock()
    recent = subscribed_cache(ttl=5.0, size=2, clock=clock)
    recent.put("alice@example.com", ALICE_A, recent.epoch)
    clock.now += 6
    assert recent.get("alice@example.com") is None
    for name in ("a@x", "b@x", "c@x"):
        recent.put(name, ALICE_A, recent.epoch)
    assert len(recent.entries) <= 2 and recent.get("c@x") == ALICE_A
