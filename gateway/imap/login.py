"""The one IMAP back-end login: greet, (ID), log in.  Nothing else greets or logs in to an
IMAP back-end: the session's first login and every routing link come here.

:func:`log_in` works on a connected socket; :func:`open_backend` adds the connect and bounds
the whole phase (connect + greeting + login) by the back-end's ``connect_timeout +
login_timeout``, so a back-end that trickles one byte at a time cannot hold a login.
"""
from __future__ import annotations

from dataclasses import dataclass


from gateway import sasl, session
from gateway.imap import referrals
from gateway.imap.backend import BackendConnection, encode_id
from gateway.imap.parser import Response
from gateway.session import Failure, LoginError, Target

# Tagged NO/BAD answer codes (RFC 5530) → how the login failed.  Anything not listed is an
# authentication failure: the client must not learn more than "failed" about a login.
NO_CODES = {
    "UNAVAILABLE": Failure.UNAVAILABLE,
    "SERVERBUG": Failure.UNAVAILABLE,
    "LIMIT": Failure.UNAVAILABLE,
    "INUSE": Failure.UNAVAILABLE,
    "CONTACTADMIN": Failure.AUTH_FAILED,
    "AUTHENTICATIONFAILED": Failure.AUTH_FAILED,
    "AUTHORIZATIONFAILED": Failure.AUTH_FAILED,
    "EXPIRED": Failure.AUTH_FAILED,
    "PRIVACYREQUIRED": Failure.AUTH_FAILED,
}


@dataclass(frozen=True)
class Credentials:
    """What the client proved itself with; never logged.  ``mechanism`` is how it logged in
    at the gateway ("LOGIN", "PLAIN", ...): PLAIN is replayed as PLAIN when possible."""
    password: str
    mechanism: str

    def __repr__(self) -> str:     # a traceback or a debug print must not show the password
        return f"Credentials(mechanism={self.mechanism!r})"


def open_backend(target: Target, credentials: Credentials,
                 id_fields: list[tuple[str, str]]) -> tuple[BackendConnection, Response]:
    """Connect to ``target`` and log in there (:func:`log_in`), the whole phase within the
    back-end's connect_timeout + login_timeout; raises LoginError (or Referred)."""
    return session.backend_phase(
        target.config, "imap", lambda sock: log_in(sock, target, credentials, id_fields))


def log_in(sock, target: Target, credentials: Credentials,
           id_fields: list[tuple[str, str]]) -> tuple[BackendConnection, Response]:
    """Greet and log in on ``sock`` (connected to ``target``); returns the logged-in
    connection and the back-end's tagged OK.

    Raises LoginError, or referrals.Referred for a login referral (RFC 2221); the socket is
    closed on any failure except an ``OK [REFERRAL]``, whose ``kept`` connection is logged in.
    """
    connection = BackendConnection(sock, target)
    try:
        _greet(connection)
        answer = _login(connection, credentials, id_fields)
    except referrals.Referred as referred:
        if referred.kept is None:
            connection.close()
        raise
    except BaseException:
        connection.close()
        raise
    return connection, answer


def _greet(connection: BackendConnection) -> None:
    """Read the greeting: OK goes on, BYE is unavailable (or a referral), PREAUTH is refused."""
    greeting = connection.read_response()
    if greeting.tag != "*" or greeting.kind not in ("OK", "BYE", "PREAUTH"):
        raise connection.fail(Failure.PROTOCOL, f"bad greeting {greeting.kind}")
    if greeting.kind == "BYE":
        referral = referrals.referral_of(greeting)
        if referral:   # RFC 2221 §4.2: "* BYE [REFERRAL ...]" instead of a greeting
            raise referrals.Referred(f"backend {connection.name}: greeting referral", referral)
        raise connection.fail(Failure.UNAVAILABLE, f"greeting BYE: {greeting.text}")
    if greeting.kind == "PREAUTH":
        raise connection.fail(Failure.PROTOCOL, "greeting PREAUTH: a back-end must ask for a login")
    if greeting.code and greeting.code.name == "CAPABILITY":
        connection.set_capabilities(greeting.code.text)
    else:
        connection.refresh_capabilities()


def _login(connection: BackendConnection, credentials: Credentials,
           id_fields: list[tuple[str, str]]) -> Response:
    """Send ID (when offered) and the login; returns the tagged OK or raises LoginError."""
    offered = connection.capabilities
    id_tag = None
    use_plain = credentials.mechanism == "PLAIN" or "LOGINDISABLED" in offered
    pipelined = connection.literal_plus() and (not use_plain or "SASL-IR" in offered)
    if "ID" in offered and id_fields:
        id_tag = connection.next_tag()
        # Pipelined, ID and the login leave in one write (one round trip, one segment).
        connection.prefix = f"{id_tag} ID ".encode() + encode_id(id_fields) + b"\r\n"
        if not pipelined:
            connection.send(b"")
            connection.await_tagged(id_tag)
            id_tag = None
    tag = connection.next_tag()
    login_name = connection.target.login_name
    updates = connection.capability_updates
    if use_plain and "AUTH=PLAIN" in offered:
        _send_plain(connection, tag, login_name, credentials.password)
    elif "LOGINDISABLED" in offered:
        raise connection.fail(Failure.UNAVAILABLE, "LOGINDISABLED and no AUTH=PLAIN")
    else:
        connection.send_command(tag, "LOGIN", [login_name, credentials.password])
    if id_tag:
        connection.await_tagged(id_tag)
    answer = connection.await_tagged(tag)
    if answer.kind == "OK" and connection.capability_updates == updates:
        # No list came with the login: the client is shown the logged-in one, not the
        # greeting's (the same list later CAPABILITY commands return).
        connection.refresh_capabilities()
    return _judge(connection, answer)


def _judge(connection: BackendConnection, answer: Response) -> Response:
    """The tagged answer to the login → the OK, a Referred, or a classified LoginError."""
    referral = referrals.referral_of(answer)
    if referral and answer.kind in ("OK", "NO"):
        # RFC 2221 §4.1: NO = log in there instead; OK = logged in, but prefer there.
        kept = (connection, answer) if answer.kind == "OK" else None
        raise referrals.Referred(f"backend {connection.name}: login referral ({answer.kind})",
                                 referral, kept)
    if answer.kind == "OK":
        return answer
    code = answer.code.name if answer.code else ""
    failure = NO_CODES.get(code, Failure.AUTH_FAILED)
    raise connection.fail(failure, f"login answer {answer.kind} [{code}] {answer.text}")


def _send_plain(connection: BackendConnection, tag: str, login_name: str, password: str) -> None:
    token = sasl.encode_plain(login_name, password)
    if "SASL-IR" in connection.capabilities:
        connection.send(f"{tag} AUTHENTICATE PLAIN ".encode() + token + b"\r\n")
        return
    connection.send(f"{tag} AUTHENTICATE PLAIN\r\n".encode())
    connection.await_continuation(tag)
    connection.send(token + b"\r\n")
