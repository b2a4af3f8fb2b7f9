"""nginx's mail proxy (and its auth_http helper) as bench servers on loopback.

nginx runs in the foreground (``daemon off``) with its own prefix, pid file and error log in
a temporary folder, ``worker_processes N`` like the gateway's N workers, and the mail module
loaded from Debian's ``libnginx-mod-mail``.  Proxy settings stay at nginx's defaults.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import servers   # tests/servers.py (on sys.path, see bench/__init__.py)

MAIL_MODULE_PATHS = ("/usr/lib/nginx/modules/ngx_mail_module.so",
                     "/usr/share/nginx/modules/ngx_mail_module.so")
WORKER_CONNECTIONS = 8192     # per worker; a proxied session holds two
NGINX_PACKAGES = "nginx-light libnginx-mod-mail"


def mail_module() -> str | None:
    return next((p for p in MAIL_MODULE_PATHS if os.path.exists(p)), None)


def missing() -> str | None:
    """Why nginx's mail proxy cannot run here, or None."""
    if servers.find_binary("nginx") is None:
        return f"nginx is not installed (apt-get install {NGINX_PACKAGES})"
    if mail_module() is None:
        return f"nginx's mail module is not installed (apt-get install {NGINX_PACKAGES})"
    return None


def version() -> str:
    binary = servers.find_binary("nginx")
    if binary is None:
        return "?"
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (done.stderr or done.stdout).strip().rpartition("/")[2] or "?"


class AuthHttp(servers._Process):
    """``python -m bench.authhttp`` answering every login with the Dovecot address."""

    name = "auth_http"

    def __init__(self, tmpdir, backend_host: str, imap_port: int, pop3_port: int):
        super().__init__(tmpdir)
        self.backend = (backend_host, imap_port, pop3_port)
        self.host, self.port = servers.LOOPBACK, 0

    def start(self) -> "AuthHttp":
        self.port = servers.free_port()
        bench_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=bench_parent)
        self._spawn([sys.executable, "-m", "bench.authhttp", str(self.port),
                     *map(str, self.backend)], self.tmpdir / "auth_http.log", env=env,
                    cwd=bench_parent)
        servers.wait_for_port(self.host, self.port, 10, self.process)
        return self


class NginxMailProxy(servers._Process):
    """nginx -p TMP -c TMP/nginx.conf: IMAP and POP3 listeners proxying to what auth_http says."""

    name = "nginx"

    def __init__(self, tmpdir, auth_http_port: int, workers: int = 2,
                 ssl_files: tuple | None = None):
        super().__init__(tmpdir)
        self.auth_http_port = auth_http_port
        self.workers = workers
        self.host, self.imap_port, self.pop3_port = servers.LOOPBACK, 0, 0
        self.ssl_files = ssl_files     # (cert, key): an IMAPS listener too, on imaps_port
        self.imaps_port = 0
        self.error_log = self.tmpdir / "error.log"

    def _imaps(self) -> str:
        if not self.ssl_files:
            return ""
        cert, key = self.ssl_files
        return f"""\
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen {self.host}:{self.imaps_port} ssl backlog=4096;
        protocol imap;
    }}
"""

    def config(self) -> str:
        return f"""\
# Written by bench/nginx.py.
load_module {mail_module()};
daemon off;
master_process on;
worker_processes {self.workers};
worker_rlimit_nofile {WORKER_CONNECTIONS * 2};
pid {self.tmpdir / "nginx.pid"};
error_log {self.error_log} error;
events {{
    worker_connections {WORKER_CONNECTIONS};
}}
mail {{
    auth_http 127.0.0.1:{self.auth_http_port}/auth;
    proxy on;
    proxy_pass_error_message on;
    server {{
        listen {self.host}:{self.imap_port} backlog=4096;
        protocol imap;
    }}
    server {{
        listen {self.host}:{self.pop3_port} backlog=4096;
        protocol pop3;
    }}
{self._imaps()}}}
"""

    def start(self) -> "NginxMailProxy":
        reason = missing()
        if reason:
            raise FileNotFoundError(reason)
        self.imap_port = servers.free_port()
        self.pop3_port = servers.free_port()
        if self.ssl_files:
            self.imaps_port = servers.free_port()
        conf = self.tmpdir / "nginx.conf"
        conf.write_text(self.config())
        self._spawn([servers.find_binary("nginx"), "-p", str(self.tmpdir), "-c", str(conf),
                     "-e", str(self.error_log)], self.tmpdir / "nginx.stdout")
        try:
            servers.wait_for_port(self.host, self.imap_port, 10, self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.stop(timeout=5)
            raise RuntimeError(f"nginx did not start: {exc}\n{self.log_text()}") from exc
        return self

    def log_text(self) -> str:
        parts = []
        for path in (self.tmpdir / "nginx.stdout", self.error_log):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)
