"""LDAP / Active Directory as a directory source, with ``ldap3``.

* ``connect``: simple bind (or anonymous), over ``ldaps://`` or StartTLS with certificate
  verification (``ldap_ca_file`` or the system CAs), every network wait bounded.
* ``search_mailboxes``: a paged search (RFC 2696; Active Directory returns at most 1,000
  entries a page, whatever the client asks for) mapped to Mailbox / Removal items.
* ``LdapResolver``: the read-through lookup of one login name for the workers (gevent makes
  ldap3's sockets cooperative), on a few reused connections.

Incremental syncs use a high-water mark: ``modifyTimestamp`` (OpenLDAP) or ``uSNChanged``
(Active Directory, which also returns deleted objects, ``isDeleted: TRUE``, when asked with the
Show Deleted control).  The ``ldap3`` import stays in this module: the master never loads it.
"""
from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars

from ..config import Config, DirectoryConfig
from .mapping import AttributeMap, Mailbox, text
from .records import MailboxRecord

log = logging.getLogger(__name__)

SHOW_DELETED_OID = "1.2.840.113556.1.4.417"   # AD: return tombstones too (non-critical)
READ_THROUGH_CONNECTIONS = 4                   # per worker process
READ_THROUGH_SOURCE = "read-through"


class LdapError(Exception):
    """The directory server cannot be used now; str() is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Removal:
    """A deleted entry (an AD tombstone): the mailbox with this id is gone."""

    dn: str
    mailbox_id: str


def connect(directory: DirectoryConfig, timeout: float) -> ldap3.Connection:
    """An open, bound connection; LdapError names the URL and the reason."""
    url = urlsplit(directory.ldap_url)
    use_ssl = url.scheme.lower() == "ldaps"
    tls = None
    if use_ssl or directory.ldap_start_tls:
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, version=ssl.PROTOCOL_TLS_CLIENT,
                        ca_certs_file=directory.ldap_ca_file or None)
    try:
        server = ldap3.Server(url.hostname, port=url.port, use_ssl=use_ssl, tls=tls,
                              get_info=ldap3.NONE, connect_timeout=timeout)
        connection = ldap3.Connection(
            server, user=directory.ldap_bind_dn or None,
            password=directory.ldap_password or None,
            authentication=ldap3.SIMPLE if directory.ldap_bind_dn else ldap3.ANONYMOUS,
            receive_timeout=max(1, math.ceil(timeout)),   # ldap3 packs it as an integer
            raise_exceptions=True, read_only=True,
            auto_referrals=False, check_names=False)
        connection.open()
        if directory.ldap_start_tls:
            connection.start_tls()
        connection.bind()
    except ldap_errors.LDAPInvalidCredentialsResult:
        raise LdapError(f"{directory.ldap_url}: bind as {directory.ldap_bind_dn!r} refused: "
                        "invalid credentials") from None
    except (ldap_errors.LDAPException, OSError) as exc:
        raise LdapError(f"{directory.ldap_url}: {describe(exc)}") from None
    return connection


def describe(exc: BaseException) -> str:
    """One line for an ldap3 or socket error."""
    if isinstance(exc, ldap_errors.LDAPOperationResult):
        return f"{exc.description}: {exc.message}".rstrip(": ") if exc.message else \
            str(exc.description)
    if isinstance(exc, ldap_errors.LDAPSocketReceiveError):
        return "no answer in time"
    return str(exc).split("\n")[0] or exc.__class__.__name__


def close(connection: ldap3.Connection | None) -> None:
    if connection is None:
        return
    try:
        connection.unbind()
    except (ldap_errors.LDAPException, OSError):
        pass


def change_attribute(directory: DirectoryConfig) -> str:
    return directory.ldap_change_attribute.lower()


def is_usn(directory: DirectoryConfig) -> bool:
    return change_attribute(directory) == "usnchanged"


def search_mailboxes(connection: ldap3.Connection, directory: DirectoryConfig,
                     attribute_map: AttributeMap, search_filter: str,
                     mark: "ChangeMark | None" = None,
                     tombstones: bool = False) -> Iterator[Mailbox | Removal]:
    """Every entry under ``ldap_base`` matching ``search_filter``, page by page.

    Entries without a mailbox are left out; ``mark`` sees every entry's change attribute.
    ``tombstones``: the Show Deleted control asks AD for deleted objects as well; those (and
    any entry with ``isDeleted: TRUE``) come back as Removal.  LdapError on any server or
    network failure.
    """
    attributes = attribute_map.attributes + [directory.ldap_change_attribute]
    controls = None
    if tombstones:
        attributes.append("isDeleted")
        controls = [(SHOW_DELETED_OID, False, None)]
    try:
        results = connection.extend.standard.paged_search(
            directory.ldap_base, search_filter, search_scope=ldap3.SUBTREE,
            attributes=list(dict.fromkeys(attributes)), paged_size=directory.ldap_page_size,
            controls=controls, generator=True)
        for result in results:
            if result.get("type") != "searchResEntry":
                continue   # search references: we do not chase referrals
            item = _entry(result, attribute_map, mark)
            if item is not None:
                yield item
    except (ldap_errors.LDAPException, OSError) as exc:
        raise LdapError(f"{directory.ldap_url}: search under {directory.ldap_base!r}: "
                        f"{describe(exc)}") from None


def _entry(result: dict, attribute_map: AttributeMap, mark) -> Mailbox | Removal | None:
    attributes = {name.lower(): values for name, values in result["raw_attributes"].items()}
    if mark is not None:
        mark.see(attributes)
    dn = result["dn"]
    deleted = attributes.get("isdeleted")
    if deleted and text(deleted[0]).upper() == "TRUE":
        return Removal(dn, attribute_map.mailbox_id(dn, attributes))
    return attribute_map.mailbox(dn, attributes)


def and_filter(*parts: str) -> str:
    """The AND of LDAP filters, each given with or without its parentheses."""
    wrapped = [p if p.startswith("(") else f"({p})" for p in parts if p]
    return wrapped[0] if len(wrapped) == 1 else "(&" + "".join(wrapped) + ")"


class ChangeMark:
    """The high-water mark of the change attribute: the largest value seen in a search, or
    (AD) ``highestCommittedUSN`` read before it, so that a change made while the search ran
    is found by the next incremental sync."""

    def __init__(self, directory: DirectoryConfig, start: str = ""):
        self.attribute = change_attribute(directory)
        self.usn = is_usn(directory)
        self.value = start

    def see(self, attributes: dict) -> None:
        values = attributes.get(self.attribute)
        if values:
            self.consider(text(values[0]).strip())

    def consider(self, value: str) -> None:
        if not value:
            return
        if self.usn:
            if value.isdigit() and (not self.value or int(value) > int(self.value)):
                self.value = value
        elif value > self.value:   # GeneralizedTime "YYYYmmddHHMMSSZ" sorts as text
            self.value = value

    def read_server_usn(self, connection: ldap3.Connection) -> None:
        """AD's rootDSE highestCommittedUSN, the start of the next incremental window."""
        if not self.usn:
            return
        try:
            connection.search("", "(objectClass=*)", ldap3.BASE,
                              attributes=["highestCommittedUSN"])
        except ldap_errors.LDAPException:
            return
        for result in connection.response or ():
            values = {k.lower(): v for k, v in result.get("raw_attributes", {}).items()}
            if values.get("highestcommittedusn"):
                self.consider(text(values["highestcommittedusn"][0]).strip())


class LdapResolver:
    """Read-through: one login name → MailboxRecord or None, asked of the directory server.

    A few connections per process are reused (ldap3 connections are not shared between
    concurrent callers); each lookup is bounded by ``lookup_timeout``.  LdapError when the
    server cannot answer in time.
    """

    def __init__(self, config: Config):
        self.config = config
        self.directory = config.directory
        self.attribute_map = AttributeMap(config.directory)
        self.idle: list[ldap3.Connection] = []
        self.slots = threading.BoundedSemaphore(READ_THROUGH_CONNECTIONS)

    def find(self, login_name: str) -> MailboxRecord | None:
        timeout = self.directory.lookup_timeout
        deadline = time.monotonic() + timeout
        if not self.slots.acquire(timeout=timeout):
            raise LdapError("every read-through connection is busy")
        try:
            results = self._search(login_name, deadline)
        finally:
            self.slots.release()
        return self._record(login_name, results)

    def _search(self, login_name: str, deadline: float) -> list[dict]:
        search_filter = and_filter(self.directory.ldap_filter, "(|" + "".join(
            f"({attribute}={escape_filter_chars(value)})"
            for attribute, value in self.attribute_map.lookup_candidates(login_name)) + ")")
        while True:
            pooled = self.idle.pop() if self.idle else None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                close(pooled)
                raise LdapError("read-through lookup timed out")
            connection = pooled or connect(self.directory, remaining)
            try:
                connection.search(self.directory.ldap_base, search_filter, ldap3.SUBTREE,
                                  attributes=self.attribute_map.attributes + ["isDeleted"],
                                  size_limit=10,
                                  time_limit=max(1, int(remaining)))
                results = [r for r in connection.response or ()
                           if r.get("type") == "searchResEntry"]
            except (ldap_errors.LDAPException, OSError) as exc:
                close(connection)
                if pooled is not None:
                    continue   # a reused connection the server had closed: one fresh try
                raise LdapError(f"{self.directory.ldap_url}: {describe(exc)}") from None
            self.idle.append(connection)
            return results

    def _record(self, login_name: str, results: list[dict]) -> MailboxRecord | None:
        mailboxes = []
        for result in results:
            attributes = {k.lower(): v for k, v in result["raw_attributes"].items()}
            if text((attributes.get("isdeleted") or [b""])[0]).upper() == "TRUE":
                continue   # a tombstone (AD returns them only when asked; be sure)
            mailbox = self.attribute_map.mailbox(result["dn"], attributes)
            if mailbox is not None and login_name in mailbox.login_names:
                mailboxes.append(mailbox)
        if len(mailboxes) > 1:
            log.warning("read-through: login name %r belongs to %d entries (%s); unknown",
                        login_name, len(mailboxes), ", ".join(m.dn for m in mailboxes[:3]))
            return None
        if not mailboxes:
            return None
        mailbox = mailboxes[0]
        backend = self.config.backend(mailbox.backend)
        if backend is None:
            log.warning("read-through: %s names back-end %r, not in [backends]; unknown",
                        mailbox.dn, mailbox.backend)
            return None
        return MailboxRecord(backend.name, mailbox.backend_login, mailbox.mailbox_id,
                             READ_THROUGH_SOURCE)

    def close(self) -> None:
        while self.idle:
            close(self.idle.pop())
