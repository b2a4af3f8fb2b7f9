"""Fixtures that start real servers: Redis, two Dovecot back-ends, slapd and the gateway.

Servers are session-scoped (each starts in well under a second); the ``gateway`` fixture is
module-scoped and ``make_gateway`` builds function-scoped ones.  Every gateway gets its own
Redis database index so directory data never leaks between them.
"""
from __future__ import annotations

import os

import pytest

import servers

USERS_A = {
    "alice@example.com": "alice-secret",
    "carol@example.com": "carol-secret",
    # Quoting, escaping, literal syntax and 8-bit UTF-8: every way a proxy can mangle LOGIN.
    "weird@example.com": 'p a"s\\s{5}wörd',
}
USERS_B = {
    "bob@example.com": "bob-secret",
    "dave@example.com": "dave-secret",
}
ROUTES = {**{login: "A" for login in USERS_A}, **{login: "B" for login in USERS_B}}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: starts real servers (Redis, Dovecot, the gateway)")
    config.addinivalue_line(
        "markers", "soak: long fault and fuzz runs, only with MAILGATE_SOAK=1 (make test-soak)")


def pytest_collection_modifyitems(config, items):
    soak = os.environ.get("MAILGATE_SOAK", "") not in ("", "0")
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
        if "soak" in item.keywords and not soak:
            item.add_marker(pytest.mark.skip(reason="soak run: make test-soak"))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_binary(name: str, package: str) -> None:
    """Skip when a server binary is missing on a developer machine; fail under CI."""
    if servers.find_binary(name) is not None:
        return
    message = f"{name} is not installed (apt-get install {package})"
    if _in_ci():
        pytest.fail(f"{message}; CI must run the integration tests", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server; ``.url`` is database 0, ``.allocate_db()`` hands out others."""
    require_binary("redis-server", "redis-server")
    server = servers.RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _dovecot(tmp_path_factory, name: str, users: dict[str, str]):
    require_binary("dovecot", "dovecot-imapd dovecot-pop3d")
    server = servers.Dovecot(tmp_path_factory.mktemp(f"dovecot-{name}"), name, users)
    server.start()
    return server


@pytest.fixture(scope="session")
def dovecot_a(tmp_path_factory):
    """Back-end A: alice, carol and weird (a password full of IMAP special characters)."""
    server = _dovecot(tmp_path_factory, "A", USERS_A)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dovecot_b(tmp_path_factory):
    """Back-end B: bob and dave."""
    server = _dovecot(tmp_path_factory, "B", USERS_B)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def slapd(tmp_path_factory):
    """OpenLDAP's slapd loaded with tests/directory_data.py's two trees (OpenLDAP mailHost
    people, Active Directory-like corp users), several thousand entries: treat those as
    read-only; a test that changes entries makes its own organizational unit."""
    require_binary("slapd", "slapd ldap-utils")
    import directory_data
    server = servers.Slapd(tmp_path_factory.mktemp("slapd"), directory_data.directory_ldif())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _spawn_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b,
                   **kwargs) -> servers.GatewayProcess:
    """A GatewayProcess (not started) with backends A and B and a fresh Redis database."""
    kwargs.setdefault("backends", {
        "A": (dovecot_a.host, dovecot_a.imap_port, dovecot_a.pop3_port),
        "B": (dovecot_b.host, dovecot_b.imap_port, dovecot_b.pop3_port),
    })
    if "redis_url" not in kwargs:
        kwargs["redis_url"] = redis_server.allocate_db()
    return servers.GatewayProcess(tmp_path_factory.mktemp("gateway"), **kwargs)


@pytest.fixture
def make_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b):
    """Factory: ``make_gateway(routes=None, start=True, **GatewayProcess kwargs)``.

    Backends default to A and B, redis_url to a fresh database.  Every gateway made here is
    stopped at teardown.
    """
    made: list[servers.GatewayProcess] = []

    def make(*, routes=None, start=True, **kwargs) -> servers.GatewayProcess:
        gateway = _spawn_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b,
                                 **kwargs)
        made.append(gateway)   # before start(): a gateway that fails half-way is still stopped
        if start:
            gateway.start()
            if routes:
                gateway.route(routes)
        return gateway

    yield make
    for gateway in made:
        gateway.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b):
    """A running gateway (2 workers, IMAP and POP3) with alice, carol, weird → A and
    bob, dave → B synced into its directory."""
    gw = _spawn_gateway(tmp_path_factory, redis_server, dovecot_a, dovecot_b)
    try:
        gw.start()
        gw.route(ROUTES)
        yield gw
    finally:
        gw.stop()
