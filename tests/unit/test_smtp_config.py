"""[submission] and [backends.NAME] submission_port: accepted values work, others are
refused naming file, key and reason."""
from __future__ import annotations

import pytest

from gateway import config as gateway_config

LISTEN = [{"protocol": "submission", "address": "127.0.0.1:10587"}]


def parse(**sections):
    return gateway_config.parse({"listen": LISTEN, **sections}, "gw.toml")


def test_defaults_and_ports():
    cfg = parse(backends={"A": {"address": "10.0.0.1"},
                          "B": {"address": "10.0.0.2", "submission_port": 2587}})
    assert cfg.listen[0].protocol == "submission"
    assert cfg.backends["A"].port("submission") == 587
    assert cfg.backends["B"].port("submission") == 2587
    assert cfg.submission.max_message_size == 52428800
    assert cfg.submission.relay_backend is None


def test_relay_becomes_one_backend():
    cfg = parse(submission={"relay": "[2001:db8::25]:587", "hostname": "smtp.example.com"})
    relay = cfg.submission.relay_backend
    assert (relay.address, relay.port("submission")) == ("2001:db8::25", 587)


@pytest.mark.parametrize("sections, key", [
    ({"submission": {"relay": "smtp.example.com"}}, "submission.relay"),
    ({"submission": {"max_message_size": 10}}, "submission.max_message_size"),
    ({"submission": {"hostname": "two words"}}, "submission.hostname"),
    ({"submission": {"xclient": True}}, "submission.xclient"),
    ({"submission": {"login_deadline": 0.5}}, "submission.login_deadline"),
    ({"submission": {"preauth_timeout": 0}}, "submission.preauth_timeout"),
    ({"backends": {"A": {"address": "x", "submission_port": 70000}}},
     "backends.A.submission_port"),
])
def test_bad_values_name_file_and_key(sections, key):
    with pytest.raises(gateway_config.ConfigError) as caught:
        parse(**sections)
    assert str(caught.value).startswith(f"gw.toml: {key}: ")


def test_xclient_login_settings():
    cfg = parse(backends={"MTA": {"address": "10.0.0.9", "submission_xclient_login": True}},
                submission={"relay": "10.0.0.25:25", "relay_xclient_login": True})
    assert cfg.backends["MTA"].submission_xclient_login
    assert cfg.submission.relay_backend.submission_xclient_login
    with pytest.raises(gateway_config.ConfigError) as caught:
        parse(submission={"relay_xclient_login": True})
    assert "submission.relay_xclient_login: needs submission.relay" in str(caught.value)


def test_xtext():
    from gateway.smtp.backend import xtext
    assert xtext("bob@example.com") == "bob@example.com"
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
