"""Which referrals the gateway follows, and where they lead.

RFC 2221 login referrals and RFC 2193 mailbox referrals name servers by IMAP URL.  The
gateway follows them itself, replaying the client's credentials, so the one rule that
matters is here: credentials go only to configured back-ends and to hosts the operator
allowed (``[referrals]``).  Everything else is refused, and the refusal is logged.
"""
from __future__ import annotations

import fnmatch
import logging

from gateway.config import BackendConfig, Config
from gateway.imap import urls
from gateway.metrics import recorder
from gateway.session import Failure, LoginError, Target

log = logging.getLogger("mailgate.referrals")

# Mechanisms whose credentials the gateway holds and can replay (RFC 5092 ";AUTH=").
REPLAYABLE = {None, "*", "PLAIN", "LOGIN"}


class Referred(LoginError):
    """A back-end referred the login elsewhere (RFC 2221).

    ``urls`` are the referral's targets, best first.  ``kept`` is set for ``OK [REFERRAL]``:
    the login succeeded where it was, and ``kept`` is that result, (logged-in connection,
    answer), used when no referral can be followed; None for ``NO``/``BYE [REFERRAL]``.
    """

    def __init__(self, detail: str, referral: list[urls.ImapUrl], kept: tuple | None = None):
        super().__init__(Failure.UNAVAILABLE, detail)
        self.urls = referral
        self.kept = kept


class ReferralPolicy:
    """The allow-list, built once per worker from the config."""

    def __init__(self, config: Config):
        self.settings = config.referrals
        self.by_address: dict[tuple[str, int], BackendConfig] = {}
        if self.settings.allow_backends:
            for backend_config in config.backends.values():
                key = (backend_config.address.lower(), backend_config.imap_port)
                self.by_address[key] = backend_config

    def config_for(self, url: urls.ImapUrl) -> BackendConfig | None:
        """The back-end settings for an allowed URL's host, or None when it is not allowed."""
        known = self.by_address.get((url.host, url.port))
        if known is not None:
            return known
        if any(fnmatch.fnmatchcase(url.host, pattern.lower())
               for pattern in self.settings.allowed_hosts):
            return BackendConfig(name=f"{url.host}:{url.port}", address=url.host,
                                 imap_port=url.port, connect_timeout=self.settings.connect_timeout,
                                 login_timeout=self.settings.login_timeout)
        return None

    def targets(self, referral: list[urls.ImapUrl], login_name: str, session_id: str) -> list[Target]:
        """The followable targets of a referral, in its order; refusals are logged."""
        found = []
        for url in referral:
            if url.auth not in REPLAYABLE:
                log.warning("session=%s referral to %s:%d refused: mechanism %s cannot be replayed",
                            session_id, url.host, url.port, url.auth)
                continue
            backend_config = self.config_for(url)
            if backend_config is None:
                log.warning("session=%s referral to %s:%d refused: host not allowed",
                            session_id, url.host, url.port)
                continue
            found.append(Target(backend_config, url.user or login_name, url.mailbox))
        return found


def referral_of(response) -> list[urls.ImapUrl] | None:
    """The URLs of a response's [REFERRAL ...] code, or None (also for an unparsable one)."""
    if response.code is None or response.code.name != "REFERRAL":
        return None
    try:
        return urls.parse_referral(response.code.text)
    except ValueError:
        return None


def follow(first: Target, open_target, policy: ReferralPolicy, session_id: str):
    """Log in at ``first`` with ``open_target(target)``, following login referrals within the
    policy; returns what ``open_target`` returned for the target the login ended on.

    ``open_target`` returns ``(connection, answer)`` or raises LoginError / Referred (whose
    ``kept`` result, for ``OK [REFERRAL]``, is returned when no referral can be followed).
    One place decides, as Dovecot's login proxy does: a referral is followed within
    ``max_hops``, never to the same host:port twice (loop), only to allowed hosts; the
    replicas of one referral are tried in order while they are unavailable.
    """
    kept: list = []      # the first OK [REFERRAL] login, (connection, answer), if any
    try:
        result, last_error = _walk(first, open_target, policy, session_id, kept)
    except BaseException:           # e.g. the client hung up: no connection stays open
        for connection, _ in kept:
            connection.close()
        raise
    if result is not None:
        for connection, _ in kept:
            connection.close()
        return result
    if kept:
        log.info("session=%s referral not followed (%s): staying logged in where referred",
                 session_id, last_error.detail)
        return kept[0]
    raise last_error


def _walk(first: Target, open_target, policy: ReferralPolicy, session_id: str,
          kept: list) -> tuple[object, LoginError | None]:
    """follow()'s loop: (result, None) on success, else (None, the last failure)."""
    queue, visited, hops = [first], set(), 0
    last_error = None      # (no error object is made on a login's way through)
    while queue:
        target = queue.pop(0)
        key = (target.config.address.lower(), target.config.imap_port)
        if key in visited:
            last_error = LoginError(Failure.UNAVAILABLE, f"referral loop at {key[0]}:{key[1]}")
            continue
        visited.add(key)
        try:
            return open_target(target), None
        except Referred as referred:
            hops += 1
            if referred.kept is not None:
                if kept:
                    referred.kept[0].close()
                else:
                    kept.append(referred.kept)    # the first working login is the fallback
            if not policy.settings.follow or hops > policy.settings.max_hops:
                return None, LoginError(Failure.UNAVAILABLE, f"{referred.detail} (not followed)")
            queue = policy.targets(referred.urls, target.login_name, session_id)
            recorder.referral("login")
            last_error = LoginError(Failure.UNAVAILABLE, f"{referred.detail}: no allowed target")
        except LoginError as exc:
            last_error = exc
            if exc.failure is not Failure.UNAVAILABLE:
                break        # a refused password is not retried at a replica
    return None, last_error or LoginError(Failure.UNAVAILABLE, "no target")
