"""SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login): the mechanisms whose
credentials the gateway holds in clear and can replay to a back-end."""
from __future__ import annotations

import base64
import binascii


def decode_plain(response: bytes) -> tuple[str, str, str] | None:
    """A base64 PLAIN message → (authzid, authcid, password), or None when malformed."""
    try:
        message = base64.b64decode(response, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    fields = message.split("\0")
    if len(fields) != 3 or not fields[1]:
        return None
    return fields[0], fields[1], fields[2]


def encode_plain(login_name: str, password: str) -> bytes:
    """The base64 PLAIN message for a login without an authorisation identity."""
    return base64.b64encode(b"\0" + login_name.encode("utf-8") + b"\0" + password.encode("utf-8"))


def login_identity(authzid: str, authcid: str) -> str:
    """The login name to route: proxy authorisation (authzid ≠ authcid) would need master-user
    rights on the back-end, so such a login gets a name that routes nowhere and fails like an
    unknown user."""
    return authcid if not authzid or authzid == authcid else "\0authzid"


LOGIN_USERNAME = base64.b64encode(b"Username:")   # the LOGIN mechanism's two challenges
LOGIN_PASSWORD = base64.b64encode(b"Password:")


def decode_login_step(response: bytes) -> str | None:
    """One base64 answer of the LOGIN mechanism (a user name or a password), or None when
    malformed; an empty answer ("=" or nothing) is the empty string."""
    if response in (b"", b"="):
        return ""
    try:
        return base64.b64decode(response, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


MECHANISMS = ("PLAIN", "LOGIN")


class Malformed(ValueError):
    """A SASL answer that cannot be decoded; ``str()`` is the text for the client."""


def exchange(mechanism: str, initial: bytes | None, ask) -> tuple[str, str] | None:
    """Run one of MECHANISMS to its end: (login name to route, password), or None when
    ``ask`` gave up (the client cancelled; ``ask`` answered it already).

    ``initial`` is the client's initial response, if any (RFC 4959 / RFC 5034);
    ``ask(challenge)`` sends a base64 challenge and returns the client's answer line or None.
    Raises Malformed.
    """
    if mechanism == "PLAIN":
        response = initial if initial is not None else ask(b"")
        if response is None:
            return None
        credentials = decode_plain(response)   # RFC 4959's "=" (empty) is malformed too
        if credentials is None:
            raise Malformed("Invalid SASL PLAIN response.")
        authzid, authcid, password = credentials
        return login_identity(authzid, authcid), password
    response = initial if initial is not None else ask(LOGIN_USERNAME)
    user = None if response is None else decode_login_step(response)
    if response is not None and not user:
        raise Malformed("Invalid SASL LOGIN response.")
    response = ask(LOGIN_PASSWORD) if user else None
    password = None if response is None else decode_login_step(response)
    if response is not None and password is None:
        raise Malformed("Invalid SASL LOGIN response.")
    return (user, password) if password is not None else None
