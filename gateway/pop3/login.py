"""The one POP3 back-end login: greeting, CAPA, XCLIENT, the replayed login.

Every line sent here is built by the gateway.  The login goes as SASL PLAIN (RFC 5034) when
the back-end offers it: base64 carries any byte safely.  USER/PASS is the fallback, and only
for credentials without CR, LF or NUL, so a client cannot append a second command.
:func:`open_backend` bounds the whole phase (connect + greeting + login) by the back-end's
connect_timeout + login_timeout.
"""
from __future__ import annotations

import functools
import re

from gateway import sasl, session
from gateway.pop3.backend import BackendConnection
from gateway.session import Failure, Target

MAX_CAPA_LINES = 100

# RFC 2449 / RFC 3206 response codes on a failed login → how it failed.
ERR_CODES = {"SYS/TEMP": Failure.UNAVAILABLE, "IN-USE": Failure.UNAVAILABLE,
             "LOGIN-DELAY": Failure.UNAVAILABLE, "SYS/PERM": Failure.UNAVAILABLE,
             "AUTH": Failure.AUTH_FAILED}


def open_backend(target: Target, password: str, client_address: tuple[str, int, str]
                 ) -> tuple[BackendConnection, bytes]:
    """Connect to ``target`` and log in (:func:`log_in`) within connect_timeout +
    login_timeout; returns the connection and the back-end's +OK line.  Raises LoginError."""
    return session.backend_phase(
        target.config, "pop3", lambda sock: log_in(sock, target, password, client_address))


def log_in(sock, target: Target, password: str, client_address: tuple[str, int, str]
           ) -> tuple[BackendConnection, bytes]:
    """Greet, tell the client's address (XCLIENT) and log in on ``sock``; the socket is
    closed on any failure.  ``client_address`` is (address, port, session id)."""
    connection = BackendConnection(sock, target)
    try:
        forward = _forward_line(*client_address)
        if not _greet(connection, forward):
            _forward_client(connection, forward)
        return connection, _login(connection, target.login_name, password)
    except BaseException:
        connection.close()
        raise


def _greet(connection: BackendConnection, forward: bytes) -> bool:
    """Read the greeting, then CAPA.  Dovecot announces XCLIENT to trusted networks in its
    greeting: then ``forward`` (the XCLIENT line) leaves in CAPA's write, one round trip for
    both.  XCLIENT goes last: Dovecot 2.3 answers a command pipelined behind XCLIENT only
    about 40 ms later.  True when the client's address was forwarded here."""
    greeting = connection.read_line()
    if not greeting.startswith(b"+OK"):
        raise connection.fail(Failure.UNAVAILABLE, f"greeting {greeting[:80]!r}")
    ahead = b""
    if greeting.startswith(b"+OK [XCLIENT]"):
        connection.capabilities.add("XCLIENT")
        ahead = forward
    connection.send(b"CAPA\r\n" + ahead)
    if connection.read_line().startswith(b"+OK"):
        connection.capabilities.update(
            _capability_names(tuple(connection.read_multiline(MAX_CAPA_LINES))))
    if ahead:
        _forward_answer(connection)
    return bool(ahead)


@functools.lru_cache(maxsize=64)
def _capability_names(lines: tuple[bytes, ...]) -> frozenset[str]:
    """A CAPA list's lines as the names kept (a back-end answers every login alike)."""
    return frozenset(line.decode("ascii", "replace").upper() for line in lines)


def _forward_line(address: str, port: int, session_id: str) -> bytes:
    """The XCLIENT line telling the back-end the real client (b"" for an address that
    cannot travel in one)."""
    if not _safe_token(address):
        return b""
    return f"XCLIENT ADDR={address} PORT={int(port)} SESSION={session_id}\r\n".encode()


def _forward_client(connection: BackendConnection, forward: bytes) -> None:
    """XCLIENT offered in CAPA (not in the greeting): the back-end logs the real client."""
    if forward and any(c.startswith("XCLIENT") for c in connection.capabilities):
        connection.send(forward)
        _forward_answer(connection)


def _forward_answer(connection: BackendConnection) -> None:
    answer = connection.read_line()
    if not answer.startswith(b"+OK"):
        raise connection.fail(Failure.UNAVAILABLE, f"XCLIENT refused: {answer[:80]!r}")


def _login(connection: BackendConnection, login_name: str, password: str) -> bytes:
    """Replay the login; returns the +OK line or raises LoginError."""
    if connection.offers_plain():
        token = sasl.encode_plain(login_name, password)
        connection.send(b"AUTH PLAIN " + token + b"\r\n")
        return _answer(connection, connection.read_line())
    if not _safe_token(login_name, spaces=True) or not _safe_token(password, spaces=True):
        raise connection.fail(Failure.AUTH_FAILED, "credentials unusable with USER/PASS")
    user = b"USER " + login_name.encode() + b"\r\n"
    secret = b"PASS " + password.encode() + b"\r\n"
    pipelining = "PIPELINING" in connection.capabilities
    if pipelining:
        connection.send(user + secret)
        user_answer = connection.read_line()
    else:
        connection.send(user)
        user_answer = connection.read_line()
        if user_answer.startswith(b"+OK"):
            connection.send(secret)
    if not user_answer.startswith(b"+OK"):
        if pipelining:
            connection.read_line()
        return _answer(connection, user_answer)
    return _answer(connection, connection.read_line())


def _answer(connection: BackendConnection, line: bytes) -> bytes:
    if line.startswith(b"+OK"):
        return line
    code = ""
    if line.startswith(b"-ERR ["):
        code = line[6:line.find(b"]")].decode("ascii", "replace").upper()
    failure = ERR_CODES.get(code, Failure.AUTH_FAILED)
    raise connection.fail(failure, f"login answer {line[:120]!r}")


_CONTROL = re.compile("[\x00-\x1f\x7f]")
_CONTROL_OR_SPACE = re.compile("[\x00-\x20\x7f]")


def _safe_token(value: str, spaces: bool = False) -> bool:
    """No byte that could end a POP3 command line (CR, LF, NUL) nor other controls."""
    return bool(value) and (_CONTROL if spaces else _CONTROL_OR_SPACE).search(value) is None
