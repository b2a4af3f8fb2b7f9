"""The generated test directory that the ``slapd`` fixture loads, and what a sync must make of it.

Two trees under dc=example,dc=com, each larger than the service account's 1,000-entry size
limit so that only a paged search reads them whole:

* ``ou=people``: OpenLDAP style, inetOrgPerson + inetLocalMailRecipient with ``mailHost``;
  uid and mail are login names, every 10th person has a second mail address, every 50th has
  no mailHost (an account without a mailbox).  ``modifyTimestamp`` is set one minute apart,
  starting in 2024, so an incremental sync after a full one reads only recent changes.
* ``ou=corp``: Active Directory style, ``msExchHomeServerName`` naming EXCH01 / EXCH02,
  userPrincipalName, sAMAccountName (CORP\\name), proxyAddresses with SMTP:/smtp:/X400:
  entries, a binary objectGUID and uSNChanged counting up from 10,000.
"""
from __future__ import annotations

import base64
import datetime
import uuid

SUFFIX = "dc=example,dc=com"
PEOPLE_BASE = f"ou=people,{SUFFIX}"
CORP_BASE = f"ou=corp,{SUFFIX}"
PEOPLE = 2600
AD_USERS = 1500
HOST_A, HOST_B = "mail-a.example.test", "mail-b.example.test"
EXCHANGE_PATH = ("/o=Example/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)"
                 "/cn=Configuration/cn=Servers/cn=")
FIRST_TIMESTAMP = datetime.datetime(2024, 1, 1)
FIRST_USN = 10_000
GUID_NAMESPACE = uuid.UUID("6ba7b812-9dad-11d1-80b4-00c04fd430c8")

BACKENDS = {
    HOST_A: {"address": "10.0.0.1"},
    HOST_B: {"address": "10.0.0.2"},
    "EXCH01": {"address": "10.0.1.1"},
    "EXCH02": {"address": "10.0.1.2"},
}


def timestamp(index: int) -> str:
    moment = FIRST_TIMESTAMP + datetime.timedelta(minutes=index)
    return f"{moment:%Y%m%d%H%M%S}Z"


def person_host(index: int) -> str | None:
    if index % 50 == 49:
        return None
    return HOST_A if index % 2 == 0 else HOST_B


def person_names(index: int) -> list[str]:
    names = [f"user{index:04d}@example.com"]
    if index % 10 == 3:
        names.append(f"first.last{index:04d}@example.com")
    return names


def person_ldif(index: int, base: str = PEOPLE_BASE, host: str | None = "default",
                stamp: str | None = "default") -> str:
    host = person_host(index) if host == "default" else host
    stamp = timestamp(index) if stamp == "default" else stamp
    lines = [f"dn: uid=user{index:04d},{base}", "objectClass: inetOrgPerson",
             "objectClass: inetLocalMailRecipient", f"uid: user{index:04d}",
             f"cn: User {index}", "sn: User"]
    lines += [f"mail: {name}" for name in person_names(index)]
    if host:
        lines.append(f"mailHost: {host}")
    if stamp:
        lines.append(f"modifyTimestamp: {stamp}")
    return "\n".join(lines) + "\n\n"


def ad_guid(index: int) -> uuid.UUID:
    return uuid.uuid5(GUID_NAMESPACE, f"ad{index}")


def ad_server(index: int) -> str:
    return "EXCH01" if index % 2 == 0 else "EXCH02"


def ad_names(index: int, netbios: str = "corp") -> list[str]:
    return [f"ad{index:04d}@corp.example.com", f"{netbios}\\ad{index:04d}",
            f"ad.alias{index:04d}@corp.example.com"]


def ad_user_ldif(index: int, base: str = f"ou=Users,{CORP_BASE}", server: str | None = None,
                 usn: int | None = None) -> str:
    server = server or ad_server(index)
    guid = base64.b64encode(ad_guid(index).bytes_le).decode()
    lines = [f"dn: cn=AD User {index},{base}", "objectClass: inetOrgPerson",
             "objectClass: mailgateADUser", f"cn: AD User {index}", "sn: User",
             f"sAMAccountName: ad{index:04d}",
             f"userPrincipalName: ad{index:04d}@corp.example.com",
             f"mail: ad{index:04d}@corp.example.com",
             f"proxyAddresses: SMTP:ad{index:04d}@corp.example.com",
             f"proxyAddresses: smtp:ad.alias{index:04d}@corp.example.com",
             f"proxyAddresses: X400:c=US;a= ;p=Example;o=Exchange;s=ad{index:04d};",
             f"msExchHomeServerName: {EXCHANGE_PATH}{server}",
             f"uSNChanged: {usn if usn is not None else FIRST_USN + index}",
             f"objectGUID:: {guid}"]
    return "\n".join(lines) + "\n\n"


def ou_ldif(dn: str) -> str:
    name = dn.split(",", 1)[0].split("=", 1)[1]
    return f"dn: {dn}\nobjectClass: organizationalUnit\nou: {name}\n\n"


def directory_ldif() -> str:
    """Everything the slapd fixture loads besides its own base entries."""
    parts = [ou_ldif(PEOPLE_BASE), ou_ldif(f"ou=groups,{SUFFIX}"), ou_ldif(CORP_BASE),
             ou_ldif(f"ou=Users,{CORP_BASE}")]
    parts += [person_ldif(i) for i in range(PEOPLE)]
    parts.append(f"dn: cn=staff,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: staff\n"
                 f"member: uid=user0000,{PEOPLE_BASE}\n\n")
    parts += [ad_user_ldif(i) for i in range(AD_USERS)]
    return "".join(parts)


def people_config(url: str, **extra) -> dict:
    """[directory] for the OpenLDAP tree."""
    from servers import Slapd
    return {"source": "ldap", "ldap_url": url, "ldap_bind_dn": Slapd.SERVICE_DN,
            "ldap_password": Slapd.SERVICE_PASSWORD, "ldap_base": PEOPLE_BASE,
            "ldap_filter": "(objectClass=inetOrgPerson)", "default_domain": "example.com",
            "login_attributes": ["uid", "mail"], "backend_attribute": "mailHost", **extra}


def corp_config(url: str, **extra) -> dict:
    """[directory] for the Active Directory-like tree."""
    from servers import Slapd
    return {"source": "ldap", "ldap_url": url, "ldap_bind_dn": Slapd.SERVICE_DN,
            "ldap_password": Slapd.SERVICE_PASSWORD, "ldap_base": CORP_BASE,
            "ldap_filter": "(objectClass=mailgateADUser)", "default_domain": "corp.example.com",
            "netbios_domain": "CORP",
            "login_attributes": ["userPrincipalName", "sAMAccountName", "mail", "proxyAddresses"],
            "backend_attribute": "msExchHomeServerName", "id_attribute": "objectGUID",
            "ldap_change_attribute": "uSNChanged", **extra}
