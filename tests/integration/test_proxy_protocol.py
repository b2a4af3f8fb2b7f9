"""PROXY protocol v1 and v2 through the real HAProxy (send-proxy, send-proxy-v2): the
original client address reaches the gateway's session log and Dovecot's log (ID
x-originating-ip for IMAP, XCLIENT for POP3); untrusted senders, malformed and missing
headers are refused."""
from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
import time

import pytest

import servers
from certs import TestCA
from conftest import ROUTES, USERS_A, USERS_B, _spawn_gateway, require_binary

CLIENT_IP = "127.0.0.2"      # the "Internet" client: neither haproxy's nor the gateway's address


class SourceIMAP4(imaplib.IMAP4):
    """imaplib from 127.0.0.2."""

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT_IP, 0))


class SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT_IP, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=None)


class SourcePOP3(poplib.POP3):
    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(CLIENT_IP, 0))


def haproxy_config(routes: dict[int, tuple[int, str]]) -> str:
    """frontend port → (gateway port, "send-proxy" | "send-proxy-v2")."""
    parts = ["global\n  maxconn 2000\n",
             "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
             "  timeout server 60s\n"]
    for front, (back, option) in routes.items():
        parts.append(f"frontend f{front}\n  bind 127.0.0.1:{front}\n  default_backend b{front}\n"
                     f"backend b{front}\n  server gw 127.0.0.1:{back} {option}\n")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, redis_server, dovecot_a, dovecot_b):
    """A gateway whose listeners all expect PROXY headers, behind a real haproxy."""
    require_binary("haproxy", "haproxy")
    ca = TestCA(tmp_path_factory.mktemp("proxyca"))
    cert, key = ca.issue("gw", ["127.0.0.1"])
    listeners = {
        "imap_v1": {"protocol": "imap", "proxy_protocol": True},
        "imap_v2": {"protocol": "imap", "proxy_protocol": True},
        "imaps_v2": {"protocol": "imap", "proxy_protocol": True, "tls": "implicit"},
        "pop3_v2": {"protocol": "pop3", "proxy_protocol": True},
        "untrusted": {"protocol": "imap", "proxy_protocol": True,
                      "proxy_trusted": ["192.0.2.0/24"]},
    }
    gw = _spawn_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b,
                        listeners=listeners,
                        sections={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    gw.start()
    gw.route(ROUTES)
    fronts = {name: servers.free_port() for name in ("imap_v1", "imap_v2", "imaps_v2", "pop3_v2")}
    options = {"imap_v1": "send-proxy"}
    config = haproxy_config({fronts[name]: (gw.ports[name], options.get(name, "send-proxy-v2"))
                             for name in fronts})
    proxy = servers.HAProxy(tmp_path_factory.mktemp("haproxy"), config, fronts.values())
    try:
        proxy.start()
        yield gw, fronts, ca
    finally:
        proxy.stop()
        gw.stop()


def wait_for(read, predicate, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if predicate(text):
            return text
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.05)


def session_tag(gw, login: str, since: int) -> str:
    """The gateway's session id of the newest session of ``login`` from CLIENT_IP."""
    text = wait_for(gw.log_text, lambda t: f"client={CLIENT_IP} " in t[since:]
                    and f"login={login}" in t[since:])
    lines = [l for l in text[since:].splitlines()
             if f"client={CLIENT_IP} " in l and f"login={login}" in l]
    return lines[-1].split("session=")[1].split()[0]


@pytest.mark.parametrize("front", ["imap_v1", "imap_v2"])
def test_imap_through_haproxy_shows_the_original_address(proxied, dovecot_a, front):
    gw, fronts, _ = proxied
    since = len(gw.log_text())
    client = SourceIMAP4("127.0.0.1", fronts[front], timeout=15)
    client.login("alice@example.com", USERS_A["alice@example.com"])
    client.select("INBOX")
    client.logout()
    tag = session_tag(gw, "alice@example.com", since)
    dovecot_log = wait_for(dovecot_a.log_text, lambda t: f"session=<{tag}>" in t)
    (line,) = [l for l in dovecot_log.splitlines() if f"session=<{tag}>" in l and "Login:" in l]
    assert f"rip={CLIENT_IP}," in line


def test_imaps_after_a_v2_header(proxied, dovecot_b):
    gw, fronts, ca = proxied
    since = len(gw.log_text())
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = False
    client = SourceIMAP4_SSL("127.0.0.1", fronts["imaps_v2"], ssl_context=context, timeout=15)
    client.login("bob@example.com", USERS_B["bob@example.com"])
    client.logout()
    tag = session_tag(gw, "bob@example.com", since)
    dovecot_log = wait_for(dovecot_b.log_text, lambda t: f"session=<{tag}>" in t)
    (line,) = [l for l in dovecot_log.splitlines() if f"session=<{tag}>" in l and "Login:" in l]
    assert f"rip={CLIENT_IP}," in line


def test_pop3_through_haproxy_v2(proxied, dovecot_b):
    gw, fronts, _ = proxied
    since = len(gw.log_text())
    client = SourcePOP3("127.0.0.1", fronts["pop3_v2"], timeout=15)
    client.user("bob@example.com")
    client.pass_(USERS_B["bob@example.com"])
    client.stat()
    client.quit()
    tag = session_tag(gw, "bob@example.com", since)
    dovecot_log = wait_for(dovecot_b.log_text, lambda t: f"session=<{tag}>" in t)
    (line,) = [l for l in dovecot_log.splitlines() if f"session=<{tag}>" in l and "Login:" in l]
    assert f"rip={CLIENT_IP}," in line


def refused(gw, port: int, payload: bytes, reason: str) -> None:
    """The connection gets no greeting, is closed, and the refusal is logged."""
    since = len(gw.log_text())
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        if payload:
            raw.sendall(payload)
        try:
            assert raw.recv(4096) == b""
        except ConnectionResetError:
            pass       # closed with the client's bytes unread: the kernel sends a reset
    wait_for(gw.log_text, lambda t: reason in t[since:])


def test_untrusted_sender_is_refused(proxied):
    gw, _, _ = proxied
    header = b"PROXY TCP4 192.0.2.9 127.0.0.1 5000 143\r\n"
    refused(gw, gw.ports["untrusted"], header, "PROXY header from an untrusted address")


def test_malformed_and_missing_headers_are_refused(proxied):
    gw, _, _ = proxied
    refused(gw, gw.ports["imap_v2"], b"a LOGIN alice@example.com x\r\n", "no PROXY header")
    refused(gw, gw.ports["imap_v2"], b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", "bad port")
    refused(gw, gw.ports["imap_v2"], b"", "no complete PROXY header within the time bound")


def test_direct_header_sets_the_session_address(proxied):
    gw, _, _ = proxied
    with socket.create_connection(("127.0.0.1", gw.ports["imap_v1"]), timeout=15) as raw:
        raw.sendall(b"PROXY TCP4 198.51.100.20 127.0.0.1 40123 143\r\na LOGOUT\r\n")
        data = b""
        while b"a OK" not in data:
            data += raw.recv(4096)
    wait_for(gw.log_text, lambda t: "client=198.51.100.20 port=40123" in t)
