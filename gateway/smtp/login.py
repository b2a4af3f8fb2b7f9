"""The one submission back-end login: greeting, EHLO, XCLIENT, the replayed AUTH (or the
login vouched for with XCLIENT LOGIN=).  :func:`open_backend` bounds the whole phase
(connect + greeting + login) by the back-end's connect_timeout + login_timeout.
"""
from __future__ import annotations


from gateway import session
from gateway.session import Target
from gateway.smtp.backend import SmtpBackend


def open_backend(target: Target, password: str | None, client: tuple[str, int, str],
                 helo_name: str) -> SmtpBackend:
    """Connect to ``target``'s submission port and log in (:func:`log_in`) within
    connect_timeout + login_timeout; raises LoginError."""
    return session.backend_phase(
        target.config, "submission",
        lambda sock: log_in(sock, target, password, client, helo_name))


def log_in(sock, target: Target, password: str | None, client: tuple[str, int, str],
           helo_name: str) -> SmtpBackend:
    """Greet, tell the client's address (XCLIENT) and log in on ``sock``: AUTH PLAIN with
    ``password``, or with None, XCLIENT LOGIN= (the password was checked by the gateway).
    ``client`` is (address, port, session id); the socket is closed on any failure."""
    backend = SmtpBackend(sock, target, helo_name)
    try:
        backend.greet()
        if password is None:
            backend.forward_client(*client, login_name=target.login_name)
            return backend
        backend.forward_client(*client)
        backend.login(target.login_name, password)
        return backend
    except BaseException:
        backend.close()
        raise
