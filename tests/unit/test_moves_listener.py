"""MoveListener.deliver: moves and kicks close sessions, a reload asks for a re-check."""
from __future__ import annotations

from gateway.directory import records
from gateway.directory.moves import MOVED_TEXT, MoveListener


def listener():
    closed, rechecks = [], []
    def connect():
        raise AssertionError("deliver() needs no Redis")
    moves = MoveListener(connect, lambda targets, text: closed.append(
        (sorted(targets.logins), text)) or 0, recheck=lambda: rechecks.append(1))
    return moves, closed, rechecks


def message(channel: str, data: bytes) -> dict:
    return {"type": "message", "channel": channel.encode(), "data": data}


def test_a_reload_asks_for_a_recheck_and_closes_nothing_itself():
    moves, closed, rechecks = listener()
    moves.deliver([message(records.RELOAD_CHANNEL, b"1")])
    assert rechecks == [1] and closed == []


def test_moves_and_a_reload_in_one_batch():
    moves, closed, rechecks = listener()
    move = records.move_message("alice@example.com", "A", "B")
    moves.deliver([message(records.MOVES_CHANNEL, move), message(records.RELOAD_CHANNEL, b"2"),
                   message(records.RELOAD_CHANNEL, b"3")])
    assert rechecks == [1]                       # once per batch
    assert closed == [(["alice@example.com"], MOVED_TEXT)]
