"""[imap]/[pop3] login_deadline: the total bound of the pre-login dialogue is range-checked."""
from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse

BASE = {"listen": [{"protocol": "imap", "address": "127.0.0.1:1143"}]}


@pytest.mark.parametrize("section", ["imap", "pop3"])
@pytest.mark.parametrize("value", [1, 120, 3600])
def test_accepted(section, value):
    assert getattr(parse({**BASE, section: {"login_deadline": value}}), section).login_deadline == value


@pytest.mark.parametrize("section", ["imap", "pop3"])
@pytest.mark.parametrize("value", [0, 0.5, 3601])
def test_refused_with_file_key_and_reason(section, value):
    with pytest.raises(ConfigError) as error:
        parse({**BASE, section: {"login_deadline": value}}, "gw.toml")
    assert str(error.value) == f"gw.toml: {section}.login_deadline: must be between 1 and 3600 seconds"


def test_default_is_two_minutes():
    config = parse(BASE)
    assert config.imap.login_deadline == config.pop3.login_deadline == 120
