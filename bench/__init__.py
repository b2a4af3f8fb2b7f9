"""``make bench``: mailgate next to direct Dovecot and nginx's mail proxy, in one run.

Everything runs on loopback in temporary folders: one Dovecot back-end, Redis, the gateway
(``python -m gateway serve``, 1, 2 and 4 workers) and nginx's mail proxy (as many workers)
with a tiny auth_http server, all in front of the same Dovecot.  ``python -m bench --help``
lists the options; ``python -m bench.scale`` (30,000 idle sessions) and
``python -m bench.directory`` (the directory sync and lookups) are separate runs.
"""

import sys
from pathlib import Path

# The servers the bench starts are the test suite's (tests/servers.py): one harness for both.
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
