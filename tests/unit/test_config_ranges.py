"""Every numeric config key has a sane range; check-config names file, key and reason.

Issue 12 item 8: ``heartbeat_timeout = 0`` passed check-config and the master then forked
thousands of workers a second.  Each key is tested at its bounds and just outside them.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config as gateway_config
from gateway.config import RANGES, ConfigError

REPO = Path(__file__).resolve().parents[2]

# Where each dataclass lives in a config file, and the extra keys its table needs.
TABLES = {
    gateway_config.ServerConfig: ("server", {}),
    gateway_config.RedisConfig: ("redis", {}),
    gateway_config.ProtocolConfig: ("imap", {}),
    gateway_config.BackendConfig: ("backends.A", {"address": "127.0.0.1"}),
    gateway_config.DirectoryConfig: ("directory", {}),
    gateway_config.ReferralConfig: ("referrals", {}),
    gateway_config.LimitsConfig: ("limits", {}),
    gateway_config.TLSConfig: ("tls", {}),
    gateway_config.SubmissionConfig: ("submission", {}),
}
LISTEN = [{"protocol": "imap", "address": "127.0.0.1:1143"}]


def _numeric_fields(cls):
    for fld in dataclasses.fields(cls):
        if isinstance(fld.default, (int, float)) and not isinstance(fld.default, bool):
            yield fld.name


def _raw(cls, key, value) -> dict:
    table, extra = TABLES[cls]
    section = {**extra, key: value}
    raw = {"listen": LISTEN}
    if table.startswith("backends."):
        raw["backends"] = {table.split(".", 1)[1]: section}
    else:
        raw[table] = section
    return raw


def _cases():
    for cls, ranges in RANGES.items():
        for key, sane in ranges.items():
            yield pytest.param(cls, key, sane, id=f"{TABLES[cls][0]}.{key}")


def test_every_numeric_key_has_a_range():
    classes = set(TABLES) | {c for c in RANGES}
    for cls in classes:
        missing = set(_numeric_fields(cls)) - set(RANGES.get(cls, {}))
        assert not missing, f"{cls.__name__}: numeric keys without a range: {sorted(missing)}"


def test_every_config_table_is_reviewed():
    """A new dataclass table with numeric keys must join RANGES (and TABLES here)."""
    for name, cls in vars(gateway_config).items():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and \
                cls is not gateway_config.Range and list(_numeric_fields(cls)):
            assert cls in RANGES, f"{name} has numeric keys but no RANGES entry"


def test_the_defaults_are_in_range():
    for cls, ranges in RANGES.items():
        defaults = cls()
        for key, sane in ranges.items():
            assert sane.check(getattr(defaults, key)) is None, (cls.__name__, key)


@pytest.mark.parametrize("cls, key, sane", list(_cases()))
def test_each_bound_is_accepted_and_beyond_it_rejected(cls, key, sane):
    integer = isinstance(getattr(cls(), key), int)
    step = 1 if integer else min(0.01, sane.low / 2 if sane.low else 0.01)
    for good in (sane.low, sane.high):
        value = int(good) if integer else float(good)
        parsed = gateway_config.parse(_raw(cls, key, value), "gw.toml")
        assert parsed is not None
    below = (int(sane.low) - 1) if integer else sane.low - step
    above = (int(sane.high) + 1) if integer else sane.high + 1
    table = TABLES[cls][0]
    for bad in (below, above):
        if bad < 0 or (bad == 0 and sane.zero):
            continue        # negatives have their own message; 0 may be a named setting
        with pytest.raises(ConfigError) as caught:
            gateway_config.parse(_raw(cls, key, bad), "gw.toml")
        message = str(caught.value)
        assert message.startswith(f"gw.toml: {table}.{key}: must be between"), message
        assert sane.why in message
    if sane.zero:
        assert gateway_config.parse(_raw(cls, key, 0), "gw.toml") is not None


@pytest.mark.parametrize("cls, key, sane", list(_cases()))
def test_a_value_of_the_wrong_kind_is_named(cls, key, sane):
    """true for a number, 1.5 for an integer: the key and what it must be (a bool is an int
    to Python, and was let through to "unsupported")."""
    integer = isinstance(getattr(cls(), key), int)
    expected = "must be an integer" if integer else "must be a number"
    for bad in ([True, 1.5, "1"] if integer else [True, "1"]):
        with pytest.raises(ConfigError) as caught:
            gateway_config.parse(_raw(cls, key, bad), "gw.toml")
        assert str(caught.value) == f"gw.toml: {TABLES[cls][0]}.{key}: {expected}"


def test_heartbeat_timeout_zero_fails_check_config(tmp_path):
    """The reported case, through the command an operator runs."""
    path = tmp_path / "gw.toml"
    path.write_text('[server]\nheartbeat_timeout = 0\n[[listen]]\nprotocol = "imap"\n'
                    'address = "127.0.0.1:1143"\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                             str(path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{path}: server.heartbeat_timeout: must be between 1 and 3600" in result.stderr


def test_the_example_config_passes():
    gateway_config.load(str(REPO / "deploy" / "gateway.example.toml"))
