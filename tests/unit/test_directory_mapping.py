"""The directory attribute mapping (LDAP, LDIF, read-through), the [directory] config rules,
and the systemd units that run the sync job."""
from __future__ import annotations

import configparser
import shlex
import uuid
from pathlib import Path

import pytest

from gateway import config as gateway_config
from gateway.__main__ import build_parser
from gateway.config import DirectoryConfig
from gateway.directory.mapping import AttributeMap, Mailbox, backend_name

REPO = Path(__file__).resolve().parents[2]
AD = DirectoryConfig(default_domain="corp.example.com", netbios_domain="CORP",
                     login_attributes=("userPrincipalName", "sAMAccountName", "proxyAddresses"),
                     backend_attribute="msExchHomeServerName", id_attribute="objectGUID")
GUID = uuid.UUID("2f33fdf7-d3ce-52c7-abc2-66918a246a25")


def test_openldap_entry():
    attribute_map = AttributeMap(DirectoryConfig(default_domain="Example.com"))
    mailbox = attribute_map.mailbox("uid=Alice,ou=people,dc=example,dc=com", {
        "uid": [b"Alice"], "mail": [b"Alice@Example.com", "A.Smith@example.com"],
        "mailhost": [b"imap1.example.com"], "entryuuid": [b"1111-AAAA"]})
    assert mailbox == Mailbox("uid=Alice,ou=people,dc=example,dc=com",
                              ("alice@example.com", "a.smith@example.com"),
                              "imap1.example.com", "", "1111-aaaa")
    assert attribute_map.attributes == ["uid", "mail", "mailhost", "entryuuid"]


def test_active_directory_entry():
    mailbox = AttributeMap(AD).mailbox("CN=Jane,DC=corp", {
        "userprincipalname": [b"Jane.Doe@corp.example.com"], "samaccountname": [b"JDoe"],
        "proxyaddresses": [b"SMTP:jane.doe@corp.example.com", b"smtp:JD@Corp.Example.com",
                           b"X400:c=US;a= ;p=Corp;s=Doe;", b"sip:jane@corp.example.com"],
        "msexchhomeservername": [b"/o=Corp/ou=AG/cn=Configuration/cn=Servers/cn=EXCH01"],
        "objectguid": [GUID.bytes_le]})
    assert mailbox.login_names == ("jane.doe@corp.example.com", "jdoe@corp.example.com",
                                   "corp\\jdoe", "jd@corp.example.com")
    assert (mailbox.backend, mailbox.mailbox_id) == ("EXCH01", str(GUID))


@pytest.mark.parametrize("attributes", [
    {"uid": [b"x"]},                                    # no back-end: not a mailbox
    {"mailhost": [b"imap1"]},                           # no login name
    {"mailhost": [b"imap1"], "uid": [b"bad\x00name", b"\xff\xfe"]},   # none usable
])
def test_entries_without_a_mailbox(attributes):
    assert AttributeMap(DirectoryConfig()).mailbox("cn=x", attributes) is None


def test_the_dn_is_the_id_when_the_id_attribute_is_missing():
    mailbox = AttributeMap(DirectoryConfig()).mailbox("UID=X,DC=Example", {
        "uid": ["x"], "mailhost": ["h"]})
    assert mailbox.mailbox_id == "uid=x,dc=example"


@pytest.mark.parametrize("value, expected", [
    ("imap1.example.com", "imap1.example.com"),
    (" imap1 ", "imap1"),
    ("/o=Org/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Configuration/cn=Servers/"
     "cn=EXCH01", "EXCH01"),
    ("/O=ORG/OU=FIRST/CN=SERVERS/CN=MBX2", "MBX2"),
])
def test_backend_name(value, expected):
    assert backend_name(value) == expected


def test_read_through_candidates_cover_every_form_of_a_login_name():
    candidates = AttributeMap(AD).lookup_candidates("jdoe@corp.example.com")
    assert ("samaccountname", "jdoe") in candidates
    assert ("proxyaddresses", "smtp:jdoe@corp.example.com") in candidates
    assert ("samaccountname", "jdoe") in AttributeMap(AD).lookup_candidates("corp\\jdoe")
    assert ("samaccountname", "jdoe") not in AttributeMap(AD).lookup_candidates("other\\jdoe")


def parse(directory: dict):
    return gateway_config.parse({"listen": [{"protocol": "imap", "address": "127.0.0.1:1"}],
                                 "directory": directory}, "gw.toml")


LDAP = {"source": "ldap", "ldap_url": "ldap://ldap.example.com", "ldap_base": "dc=example"}


def test_miss_defaults_by_source():
    assert parse({}).directory.miss == "unknown"
    assert parse(LDAP).directory.miss == "read-through"
    assert parse({**LDAP, "miss": "unavailable"}).directory.miss == "unavailable"


@pytest.mark.parametrize("directory, message", [
    ({"miss": "read-through"}, "gw.toml: directory.miss: \"read-through\" needs source"),
    ({"miss": "maybe"}, "gw.toml: directory.miss: must be"),
    ({"source": "ldap", "ldap_base": "dc=x"}, "gw.toml: directory.ldap_url: source = \"ldap\" needs"),
    ({**LDAP, "ldap_url": "http://x"}, "gw.toml: directory.ldap_url: "),
    ({**LDAP, "ldap_base": ""}, "gw.toml: directory.ldap_base: is required"),
    ({**LDAP, "ldap_url": "ldaps://x", "ldap_start_tls": True},
     "gw.toml: directory.ldap_start_tls: is for ldap:// URLs"),
    ({**LDAP, "ldap_change_attribute": "whenChanged"},
     "gw.toml: directory.ldap_change_attribute: must be one of"),
    ({"login_attributes": []}, "gw.toml: directory.login_attributes: must name"),
    ({"ldap_page_size": 0}, "gw.toml: directory.ldap_page_size: must be between 1 and 100000"),
    ({"ldap_pagesize": 10}, "gw.toml: directory.ldap_pagesize: unknown key"),
])
def test_directory_config_errors(directory, message):
    with pytest.raises(gateway_config.ConfigError) as caught:
        parse(directory)
    assert str(caught.value).startswith(message)


def test_the_systemd_units_run_the_incremental_sync():
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(REPO / "deploy" / "mailgate-sync.service")
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[1:3] == ["-m", "gateway"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.source, args.incremental) == ("sync", "ldap", True)
    assert service["Service"]["Type"] == "oneshot"
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(REPO / "deploy" / "mailgate-sync.timer")
    assert timer["Timer"]["OnUnitInactiveSec"] and timer["Install"]["WantedBy"] == "timers.target"


def test_the_example_config_documents_every_directory_key():
    example = gateway_config.load(str(REPO / "deploy" / "gateway.example.toml"))
    text = (REPO / "deploy" / "gateway.example.toml").read_text()
    readme = (REPO / "README.md").read_text()
    for key in DirectoryConfig.__dataclass_fields__:
        assert f"\n{key} = " in text, key
        assert f"`{key}`" in readme or f"`[directory] {key}`" in readme, key
    assert example.directory.source == "export"
