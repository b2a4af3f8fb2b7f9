"""gateway.logs.event: the session-end line written directly is the line logging writes."""
import io
import logging
import re

import pytest

from gateway import logs

FIELDS = dict(session="7d7e.2", proto="imap", client="2001:db8::1", port=55746,
              login='we"ird\\name\x01', backend="A", tls=False, duration=0.0123,
              bytes_in=12, bytes_out=0, end="client closed", state=None)


@pytest.fixture
def text_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("info", "text")
    stream = io.StringIO()
    root.handlers[0].stream = stream
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _line(stream: io.StringIO) -> str:
    text = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    return text


def test_the_direct_line_is_the_logging_modules_line(text_logging):
    log = logging.getLogger("mailgate.test-direct")
    logs.event(log, logging.INFO, "session-end", **FIELDS)
    direct = _line(text_logging)
    log.addFilter(lambda record: True)      # a filter: the logging module's own path
    try:
        logs.event(log, logging.INFO, "session-end", **FIELDS)
    finally:
        log.filters.clear()
    through_logging = _line(text_logging)
    assert direct.endswith("\n") and direct.count("\n") == 1
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[\d+\] mailgate.test-direct: "
    assert re.match(stamp, direct) and re.match(stamp, through_logging)
    assert direct[23:] == through_logging[23:]           # the same after the clock


def test_another_handler_gets_the_event_through_logging(text_logging):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    log = logging.getLogger("mailgate.test-direct")
    extra = Keep()
    log.addHandler(extra)
    try:
        logs.event(log, logging.INFO, "refused", client="127.0.0.1", reason="full")
    finally:
        log.removeHandler(extra)
    assert seen == ["event=refused client=127.0.0.1 reason=full"]
    assert "event=refused client=127.0.0.1 reason=full" in _line(text_logging)


def test_a_level_below_the_loggers_writes_nothing(text_logging):
    logs.event(logging.getLogger("mailgate.test-direct"), logging.DEBUG, "noise", a=1)
    assert _line(text_logging) == ""


from hypothesis import given, settings, strategies as st  # noqa: E402

_VALUES = st.one_of(st.text(max_size=300), st.integers(), st.booleans(), st.none(),
                    st.floats(allow_nan=False), st.sampled_from(["", " ", "a=b", 'q"', "x" * 201]))


@settings(max_examples=2000, deadline=None)
@given(st.dictionaries(st.sampled_from(["session", "login", "port", "end", "tls"]), _VALUES))
def test_the_fast_paths_of_a_line_render_as_kv_value_does(fields):
    reference = " ".join(["event=e"] + [f"{k}={logs._kv_value(v)}" for k, v in fields.items()])
    assert str(logs._Event("e", fields)) == reference
