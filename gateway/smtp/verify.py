"""Checking a submission password where the mailbox lives, for back-ends that take the
login from the gateway (``XCLIENT LOGIN=``) instead of authenticating it themselves.

A plain MTA trusting the gateway's XCLIENT has no password database: the gateway must have
checked the credentials before it vouches for them.  It does so the one way it knows, the
IMAP login of gateway.imap at the mailbox's back-end (from the directory), then logs out.
"""
from __future__ import annotations

from gateway.session import LoginError, Target


def check_password(target: Target, password: str, mechanism: str, session_id: str) -> None:
    """Log in at ``target``'s IMAP back-end and out again; LoginError unless it accepted."""
    from gateway.imap import login
    from gateway.imap.referrals import Referred
    try:
        connection, _ = login.open_backend(target, login.Credentials(password, mechanism),
                                           [("x-session-ext-id", session_id)])
    except Referred as referred:
        if referred.kept is None:    # NO [REFERRAL]: the password was not checked here
            raise
        connection = referred.kept[0]   # OK [REFERRAL]: logged in where it was
    try:
        connection.send(b"Z LOGOUT\r\n")
    except LoginError:      # the answer that mattered is in
        pass
    connection.close()
