"""The pure pieces of metrics, logs, limits and their config keys."""
from __future__ import annotations

import json
import logging
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gateway import config as config_mod
from gateway import logs, metrics
from gateway.limits import Limits

LISTEN = [{"address": "127.0.0.1:1"}]


def parse(**sections):
    return config_mod.parse({"listen": LISTEN, **sections}, "test.toml")


@pytest.mark.parametrize("sections, key", [
    ({"redis": {"sentinels": ["a:1"]}}, "redis.service_name"),
    ({"redis": {"sentinels": ["a:1"], "service_name": "m", "url": "redis://x"}}, "redis.url"),
    ({"redis": {"sentinels": ["nope"], "service_name": "m"}}, "redis.sentinels[0]"),
    ({"redis": {"service_name": "m"}}, "redis.sentinels"),
    ({"limits": {"trusted_networks": ["10.0.0.0/33"]}}, "limits.trusted_networks[0]"),
    ({"limits": {"session_ttl": 0}}, "limits.session_ttl"),
    ({"limits": {"max_connections_per_ip": 3}}, "limits.max_connections_per_ip"),
    ({"server": {"log_format": "xml"}}, "server.log_format"),
])
def test_bad_ops_keys_name_file_and_key(sections, key):
    with pytest.raises(config_mod.ConfigError, match=rf"^test\.toml: {key.replace('[', '.').replace(']', '.')}"):
        parse(**sections)


def test_sentinel_config_is_accepted():
    config = parse(redis={"sentinels": ["10.0.0.1:26379", "[::1]:26380"],
                          "service_name": "mailgate"})
    assert config.redis.sentinels == ("10.0.0.1:26379", "[::1]:26380")


def test_kv_values_are_readable_and_quoted():
    line = str(logs._Event("session-end", {"login": "jo smith@example.com", "end": "client closed",
                                           "tls": False, "duration": 1.23456, "backend": "",
                                           "evil": "a\r\nb=c \"q\""}))
    assert line == ('event=session-end login="jo smith@example.com" end="client closed" tls=no '
                    'duration=1.235 backend=- evil="a\\\\r\\\\nb=c \\"q\\""')
    assert "\\x20" not in line and "\n" not in line
    assert logs.readable("Jörg Müller") == "Jörg Müller"


def test_json_lines_carry_event_fields():
    record = logging.LogRecord("mailgate.session", logging.INFO, __file__, 1,
                               logs._Event("login-failed", {"login": "a\nb", "delay": 0.5}),
                               None, None)
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["event"] == "login-failed" and entry["login"] == "a\\nb"
    assert entry["delay"] == 0.5 and entry["level"] == "info"
    plain = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    assert json.loads(logs.JsonFormatter().format(plain))["msg"] == "hello you"


def test_failure_delay_doubles_up_to_the_maximum():
    config = parse(server={"auth_failure_delay": 0.5},
                   limits={"auth_failure_max_delay": 3, "auth_failures_per_login": 10,
                           "auth_failures_per_address": 100})
    limits = Limits.__new__(Limits)
    limits.settings, limits.base_delay = config.limits, config.server.auth_failure_delay
    assert [limits.delay(0, n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3, 3]
    assert limits.delay(20, 1) == 1.0      # 20 failures from the address weigh as 2 of one login
    assert limits.delay(40, 1) == 3        # as 4: 4.0, capped


def test_histogram_flush_in_buckets_equals_observe_each():
    values = [random.expovariate(1000) for _ in range(500)] + [0.0002, 1.0, 7.0]
    one, many = CollectorRegistry(), CollectorRegistry()
    each = Histogram("h", "h", buckets=metrics.LOOKUP_BUCKETS, registry=one)
    batched = Histogram("h", "h", buckets=metrics.LOOKUP_BUCKETS, registry=many)
    for value in values:
        each.observe(value)
    metrics._observe_many(batched, values)

    def samples(registry):
        return [(s.name, s.labels, round(s.value, 9)) for f in registry.collect()
                for s in f.samples if not s.name.endswith("_created")]
    assert samples(one) == samples(many)


def test_recorder_without_a_metrics_folder_only_counts():
    recorder = metrics.Recorder()
    recorder.opened("imap", "x")
    recorder.closed("imap", "x", "proxying", 10, 20)
    recorder.flush()            # no PROMETHEUS_MULTIPROC_DIR here: nothing written
    assert recorder.current["imap", "x"] == 0


def test_limits_are_off_only_when_every_limit_is_zero():
    from gateway import limits
    assert limits.enabled(parse())             # throttling is on by default
    off = {"auth_failures_per_login": 0, "auth_failures_per_address": 0}
    assert not limits.enabled(parse(limits=off))
    assert limits.enabled(parse(limits={**off, "max_connections_per_login": 3}))
