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


def _reference_value(value) -> str:
    """A field's text the plain way (no fast path): "-" for nothing, yes/no, 3 decimals,
    else the readable text, double-quoted when it holds a space, a quote, = or \\."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return str(value)
    text = logs.readable(str(value))
    if re.search(r'[ "=\\]', text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


@settings(max_examples=2000, deadline=None)
@given(st.dictionaries(st.sampled_from(["session", "login", "port", "end", "tls"]), _VALUES))
def test_the_fast_paths_of_a_line_render_as_the_plain_way(fields):
    reference = " ".join(["event=e"] + [f"{k}={_reference_value(v)}" for k, v in fields.items()])
    assert str(logs._Event("e", fields)) == reference


# -- held lines (a worker's session-end lines) -------------------------------------------------

@pytest.fixture
def holding(text_logging):
    armed = []
    logs.hold_lines(lambda: armed.append(1))
    yield text_logging, armed
    logs.write_held()
    logs._held = None


def _direct_only() -> None:
    """Leave setup()'s handler alone on the root logger: pytest adds its capturing handlers
    for the test's call, and an event that would reach them goes through logging at once."""
    logging.getLogger().handlers[:] = [logs._direct]


def test_a_held_line_waits_for_write_held_and_is_the_same_line(holding):
    stream, armed = holding
    _direct_only()
    log = logging.getLogger("mailgate.test-direct")
    logs.held_event(log, logging.INFO, "session-end", **FIELDS)
    logs.held_event(log, logging.INFO, "session-end", **FIELDS)
    assert stream.getvalue() == "" and armed == [1]       # the timer armed once, for the first
    logs.write_held()
    held = _line(stream).splitlines(keepends=True)
    logs._held = None
    logs.event(log, logging.INFO, "session-end", **FIELDS)
    alone = _line(stream)
    assert len(held) == 2 and all(line[23:] == alone[23:] for line in held)
    logs.hold_lines(lambda: armed.append(1))
    logs.held_event(log, logging.INFO, "session-end", **FIELDS)
    assert armed == [1, 1]                                 # armed again after a write


def test_any_other_line_writes_the_held_ones_first(holding):
    stream, _ = holding
    _direct_only()
    log = logging.getLogger("mailgate.test-direct")
    logs.held_event(log, logging.INFO, "session-end", session="first")
    logs.event(log, logging.WARNING, "login-failed", session="second")
    log.error("third")                                     # through the logging module
    lines = _line(stream).splitlines()
    assert ["session=first" in lines[0], "session=second" in lines[1],
            lines[2].endswith("third")] == [True, True, True]


def test_max_held_lines_are_written_without_waiting(holding):
    stream, _ = holding
    _direct_only()
    log = logging.getLogger("mailgate.test-direct")
    for number in range(logs.MAX_HELD - 1):
        logs.held_event(log, logging.INFO, "session-end", session=str(number))
    assert stream.getvalue() == ""
    logs.held_event(log, logging.INFO, "session-end", session="last")
    assert stream.getvalue().count("\n") == logs.MAX_HELD


def test_held_lines_go_out_in_writes_of_whole_lines_up_to_pipe_buf(holding):
    stream, _ = holding
    _direct_only()
    writes = []
    real_write = stream.write
    stream.write = lambda text: writes.append(text) or real_write(text)
    log = logging.getLogger("mailgate.test-direct")
    for number in range(40):
        logs.held_event(log, logging.INFO, "session-end", login="é" * 150, n=number)
    logs.write_held()
    assert len(writes) > 1 and "".join(writes).count("\n") == 40
    assert all(len(w.encode()) <= logs.WRITE_BYTES and w.endswith("\n") for w in writes)
