"""The last full sync, remembered in run_dir for the master's refill (gateway/directory/lastsync.py)."""
from __future__ import annotations

from gateway import config as gateway_config
from gateway.directory import lastsync, records
from gateway.directory.lastsync import LastSync


def config_in(tmp_path):
    return gateway_config.parse({"listen": [{"protocol": "imap", "address": "127.0.0.1:1"}],
                                 "server": {"run_dir": str(tmp_path / "run")}}, "t.toml")


class FakeRedis:
    """Answers GET of the live-generation pointer only (what refill_reason reads)."""

    def __init__(self, current):
        self.current = current

    def get(self, key):
        assert key == records.CURRENT_KEY
        return None if self.current is None else str(self.current).encode()


def test_remember_and_recall(tmp_path):
    config = config_in(tmp_path)
    assert lastsync.recall(config) is None
    lastsync.remember(config, LastSync("export", 7, "/data/users.csv"))
    assert lastsync.recall(config) == LastSync("export", 7, "/data/users.csv")
    assert lastsync.recall(config).argv() == ["sync", "export", "/data/users.csv"]
    lastsync.remember(config, LastSync("ldap", 8))
    assert lastsync.recall(config).argv() == ["sync", "ldap"]


def test_unreadable_state_is_no_state(tmp_path):
    config = config_in(tmp_path)
    path = tmp_path / "run" / lastsync.STATE_FILE
    path.parent.mkdir()
    for text in ("", "{", "[]", '{"kind": "ftp", "generation": 1}',
                 '{"kind": "export", "generation": 1}', '{"kind": "ldap", "generation": "x"}'):
        path.write_text(text)
        assert lastsync.recall(config) is None, text


def test_refill_reason():
    last = LastSync("export", 5, "/x.csv")
    assert "empty" in lastsync.refill_reason(FakeRedis(None), last)
    assert "older" in lastsync.refill_reason(FakeRedis(4), last)
    assert lastsync.refill_reason(FakeRedis(5), last) is None
    assert lastsync.refill_reason(FakeRedis(9), last) is None    # another host synced since
