"""Directory entries (LDAP, LDIF) → mailboxes: login names, back-end, back-end login, id.

One mapping, configured under ``[directory]``, shared by the LDAP sync, the LDIF export reader
and the read-through lookup, so that all three derive the same login names from an entry:

* every value of every ``login_attributes`` attribute is a login name (``normalize_login``,
  so case-insensitive and completed with ``default_domain``);
* ``proxyAddresses`` values count only with an ``smtp:`` prefix (``SMTP:`` is the primary
  address, ``smtp:`` the others; ``X400:``, ``sip:`` ... are not login names);
* ``sAMAccountName`` also gives ``NETBIOS\\name`` when ``netbios_domain`` is set (the
  down-level logon name Windows clients send);
* the back-end is the first value of ``backend_attribute``; an Exchange-style DN path such as
  ``msExchHomeServerName`` (``/o=Org/ou=.../cn=Servers/cn=EXCH01``) names its server in the
  last ``cn=``;
* the mailbox id is the first value of ``id_attribute`` (an AD ``objectGUID`` is 16 bytes,
  shown as its GUID string), else the entry's DN in lower case.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..config import DirectoryConfig
from .records import normalize_login

SMTP_PREFIX = "smtp:"
SPECIAL_ATTRIBUTES = ("proxyaddresses", "samaccountname")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One mailbox from one directory entry; ``login_names`` are normalized and distinct."""

    dn: str
    login_names: tuple[str, ...]
    backend: str
    backend_login: str = ""
    mailbox_id: str = ""


class AttributeMap:
    """How entry attributes map to a Mailbox (see the module docstring)."""

    def __init__(self, config: DirectoryConfig):
        self.login_attributes = tuple(a.lower() for a in config.login_attributes)
        self.backend_attribute = config.backend_attribute.lower()
        self.backend_login_attribute = config.backend_login_attribute.lower()
        self.id_attribute = config.id_attribute.lower()
        self.default_domain = config.default_domain
        self.netbios_domain = config.netbios_domain.strip().lower()

    @property
    def attributes(self) -> list[str]:
        """The attribute names a search must ask for."""
        names = [*self.login_attributes, self.backend_attribute]
        names += [a for a in (self.backend_login_attribute, self.id_attribute) if a]
        return list(dict.fromkeys(names))

    def mailbox(self, dn: str, attributes: Mapping[str, list]) -> Mailbox | None:
        """The mailbox of an entry whose attribute names are lower case and values are str
        or bytes; None when the entry has no back-end or no usable login name (groups,
        organizational units, accounts without a mailbox)."""
        backend = backend_name(first_text(attributes.get(self.backend_attribute)))
        if not backend:
            return None
        names = self.login_names(attributes)
        if not names:
            return None
        backend_login = ""
        if self.backend_login_attribute:
            backend_login = first_text(attributes.get(self.backend_login_attribute)).strip()
        return Mailbox(dn, names, backend, backend_login, self.mailbox_id(dn, attributes))

    def login_names(self, attributes: Mapping[str, list]) -> tuple[str, ...]:
        """Every login name of an entry, normalized, in attribute order, without repeats.
        Values that are not login names (bad characters, too long) are left out."""
        found: dict[str, None] = {}
        domain = self.default_domain
        for attribute in self.login_attributes:
            special = attribute in SPECIAL_ATTRIBUTES
            for value in attributes.get(attribute) or ():
                try:
                    value = value.decode() if isinstance(value, bytes) else str(value)
                    if not special:     # the common case, without a generator
                        found[normalize_login(value, domain)] = None
                        continue
                    for name in self.names_of_value(attribute, value):
                        found[normalize_login(name, domain)] = None
                except ValueError:      # UnicodeDecodeError, or not a login name
                    continue
        return tuple(found)

    def names_of_value(self, attribute: str, value: str) -> Iterable[str]:
        if attribute == "proxyaddresses":
            if value[:len(SMTP_PREFIX)].lower() == SMTP_PREFIX:
                yield value[len(SMTP_PREFIX):]
            return
        yield value
        if attribute == "samaccountname" and self.netbios_domain and value.strip():
            yield f"{self.netbios_domain}\\{value.strip()}"

    def mailbox_id(self, dn: str, attributes: Mapping[str, list]) -> str:
        values = attributes.get(self.id_attribute) if self.id_attribute else None
        if values:
            value = values[0]
            if isinstance(value, bytes) and self.id_attribute == "objectguid" and len(value) == 16:
                return str(uuid.UUID(bytes_le=value))
            try:
                return text(value).strip().lower()
            except UnicodeDecodeError:
                return value.hex()
        return dn.lower()

    def lookup_candidates(self, login_name: str) -> list[tuple[str, str]]:
        """(attribute, value) pairs an entry owning ``login_name`` (normalized) has at least
        one of: the read-through search ORs them, then ``login_names`` confirms the match."""
        values = [login_name]
        local, _, domain = login_name.rpartition("@")
        if local and self.default_domain and domain == self.default_domain.strip().lower():
            values.append(local)      # stored without the domain, completed by normalize
        pairs = []
        for attribute in self.login_attributes:
            if attribute == "proxyaddresses":
                pairs.append((attribute, SMTP_PREFIX + login_name))
                continue
            pairs += [(attribute, value) for value in values]
            netbios, sep, user = login_name.partition("\\")
            if attribute == "samaccountname" and sep and netbios == self.netbios_domain:
                pairs.append((attribute, user))
        return list(dict.fromkeys(pairs))


def backend_name(value: str) -> str:
    """A back-end value as the config knows it: a host name as is, an Exchange server DN path
    (``.../cn=Servers/cn=EXCH01``) reduced to the server's name."""
    value = value.strip()
    position = value.lower().rfind("/cn=")
    if position >= 0:
        return value[position + 4:].strip()
    return value


def first_text(values) -> str:
    return text(values[0]) if values else ""


def text(value) -> str:
    """An attribute value as text (LDAP strings are UTF-8; RFC 4517)."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
