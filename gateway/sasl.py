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
