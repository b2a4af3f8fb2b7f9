"""gateway.imap.referrals.follow driven by a fake opener: hops, loops, refused hosts,
replicas, OK [REFERRAL] keeping the working login, a referral in a ``* BYE`` greeting."""
from __future__ import annotations

import pytest

from gateway.config import parse
from gateway.imap.referrals import ReferralPolicy, Referred, follow
from gateway.imap.urls import parse_referral
from gateway.session import Failure, LoginError, Target


def policy(**referrals) -> ReferralPolicy:
    raw = {"listen": [{"protocol": "imap", "address": "127.0.0.1:1143"}],
           "backends": {name: {"address": f"10.0.0.{i}", "imap_port": 143}
                        for i, name in enumerate(("A", "B", "C", "D"), start=1)},
           "referrals": referrals}
    return ReferralPolicy(parse(raw))


class Connection:
    def __init__(self, where: str):
        self.where = where
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeOpener:
    """Each back-end address answers as scripted: "ok", "auth", "down", "no-ref URL",
    "ok-ref URL" (logged in, but referred) or "bye-ref URL" (a BYE [REFERRAL] greeting)."""

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.opened: list[str] = []
        self.kept: list[Connection] = []

    def __call__(self, target: Target):
        where = target.config.address
        self.opened.append(where)
        action, _, url = self.script[where].partition(" ")
        if action == "ok":
            return Connection(where), f"OK at {where} as {target.login_name}"
        if action == "auth":
            raise LoginError(Failure.AUTH_FAILED, "wrong password")
        if action == "down":
            raise LoginError(Failure.UNAVAILABLE, "connect refused")
        kept = None
        if action == "ok-ref":
            kept = (Connection(where), f"OK at {where}")
            self.kept.append(kept[0])
        raise Referred(f"{where}: {action}", parse_referral(url), kept)


def first() -> Target:
    return Target(policy().by_address[("10.0.0.1", 143)], "user@example.com")


def run(script, **settings):
    opener = FakeOpener(script)
    return opener, follow(first(), opener, policy(**settings), "test")


def test_no_referral_returns_the_first_login():
    opener, (connection, answer) = run({"10.0.0.1": "ok"})
    assert connection.where == "10.0.0.1" and opener.opened == ["10.0.0.1"]


def test_hops_are_followed_with_the_referred_user():
    opener, (connection, answer) = run({
        "10.0.0.1": "no-ref imap://other@10.0.0.2/",
        "10.0.0.2": "bye-ref imap://10.0.0.3/",
        "10.0.0.3": "ok"})
    assert opener.opened == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert answer == "OK at 10.0.0.3 as other"


def test_max_hops_cuts_off():
    with pytest.raises(LoginError) as failure:
        run({"10.0.0.1": "no-ref imap://10.0.0.2/", "10.0.0.2": "no-ref imap://10.0.0.3/",
             "10.0.0.3": "ok"}, max_hops=1)
    assert failure.value.failure is Failure.UNAVAILABLE
    assert "not followed" in failure.value.detail


def test_a_loop_is_detected():
    with pytest.raises(LoginError) as failure:
        run({"10.0.0.1": "no-ref imap://10.0.0.2/", "10.0.0.2": "no-ref imap://10.0.0.1/"})
    assert "referral loop" in failure.value.detail


def test_a_host_not_allowed_is_never_opened():
    opener = FakeOpener({"10.0.0.1": "no-ref imap://evil.example.net/"})
    with pytest.raises(LoginError) as failure:
        follow(first(), opener, policy(), "test")
    assert opener.opened == ["10.0.0.1"]
    assert "no allowed target" in failure.value.detail


def test_replicas_are_tried_in_order_while_unavailable():
    opener, (connection, _) = run({
        "10.0.0.1": "no-ref imap://10.0.0.2/ imap://10.0.0.3/ imap://10.0.0.4/",
        "10.0.0.2": "down", "10.0.0.3": "ok", "10.0.0.4": "ok"})
    assert opener.opened == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert connection.where == "10.0.0.3"


def test_a_refused_password_is_not_tried_at_the_next_replica():
    opener = FakeOpener({"10.0.0.1": "no-ref imap://10.0.0.2/ imap://10.0.0.3/",
                         "10.0.0.2": "auth", "10.0.0.3": "ok"})
    with pytest.raises(LoginError) as failure:
        follow(first(), opener, policy(), "test")
    assert failure.value.failure is Failure.AUTH_FAILED
    assert opener.opened == ["10.0.0.1", "10.0.0.2"]


def test_ok_referral_keeps_the_working_login_when_the_referral_fails():
    opener, (connection, answer) = run({"10.0.0.1": "ok-ref imap://10.0.0.2/",
                                        "10.0.0.2": "down"})
    assert connection.where == "10.0.0.1" and not connection.closed
    assert answer == "OK at 10.0.0.1"


def test_ok_referral_followed_closes_the_kept_login():
    opener, (connection, _) = run({"10.0.0.1": "ok-ref imap://10.0.0.2/", "10.0.0.2": "ok"})
    assert connection.where == "10.0.0.2"
    assert opener.kept[0].closed


def test_follow_off_keeps_an_ok_referral_and_refuses_a_no_referral():
    opener, (connection, _) = run({"10.0.0.1": "ok-ref imap://10.0.0.2/"}, follow=False)
    assert connection.where == "10.0.0.1" and opener.opened == ["10.0.0.1"]
    with pytest.raises(LoginError):
        run({"10.0.0.1": "no-ref imap://10.0.0.2/"}, follow=False)


def test_bye_referral_greeting_is_followed():
    opener, (connection, _) = run({"10.0.0.1": "bye-ref imap://10.0.0.4/", "10.0.0.4": "ok"})
    assert connection.where == "10.0.0.4"


def test_an_exception_while_following_closes_the_kept_login():
    class Gone(Exception):
        pass

    opener = FakeOpener({"10.0.0.1": "ok-ref imap://10.0.0.2/"})

    def open_target(target):
        if target.config.address == "10.0.0.2":
            raise Gone()      # the client hung up while the referred login was on its way
        return opener(target)

    with pytest.raises(Gone):
        follow(first(), open_target, policy(), "test")
    assert opener.kept[0].closed
