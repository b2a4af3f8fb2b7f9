"""``python -m bench.tls`` runs end to end with tiny figures and leaves no folder behind (no
figure is asserted: benchmarks measure, tests assert behaviour)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import servers
from conftest import require_binary


def test_bench_tls_runs():
    require_binary("dovecot", "dovecot-imapd dovecot-pop3d")
    require_binary("redis-server", "redis-server")
    # Its own short TMPDIR (Dovecot's socket paths must stay under the unix-socket limit).
    tmpdir = tempfile.mkdtemp(prefix="mgt")
    try:
        result = subprocess.run([sys.executable, "-m", "bench.tls", "--seconds", "0.5",
                                 "--sessions", "5", "--fetch-seconds", "0.2", "--rounds", "1"],
                                cwd=servers.REPO_ROOT, capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, TMPDIR=tmpdir))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "full handshakes/s:" in result.stdout and "idle KiB per session" in result.stdout
        assert "mailgate tls" in result.stdout and "direct tls" in result.stdout
        assert os.listdir(tmpdir) == []
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
